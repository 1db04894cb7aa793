"""A family of checkpoints (base, instruct, experts) opened lazily and checked for compatibility.

Everything that can be known from headers alone is checked here, before any tensor is read or
any output written: same model_type, same tensor names, same shapes, same layer count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from lata.architectures import REST, Architecture, architecture_for
from lata.checkpoints import Checkpoint, CheckpointError

RESERVED_ROLES = ("base", "instruct")


@dataclass
class Family:
    base: Checkpoint
    instruct: Checkpoint
    experts: dict[str, Checkpoint]
    architecture: Architecture = field(init=False)
    #: exact selections over this family's vectors, kept while it is open so that the points of
    #: a sweep share them (TIES thresholds: lata.engine); keys name what was selected
    selections: dict[tuple, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.experts:
            raise CheckpointError("a family needs at least one expert")
        for name in self.experts:
            if name in RESERVED_ROLES:
                raise CheckpointError(f"expert name '{name}' is reserved for a family role")
        self.architecture = self._check_compatible()

    @classmethod
    def open(cls, base: str | os.PathLike, instruct: str | os.PathLike,
             experts: dict[str, str | os.PathLike]) -> "Family":
        """Open every checkpoint (headers only) and check they can be merged."""
        return cls(
            base=Checkpoint(base, role="base"),
            instruct=Checkpoint(instruct, role="instruct"),
            experts={name: Checkpoint(path, role=f"expert '{name}'") for name, path in experts.items()},
        )

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return [self.base, self.instruct, *self.experts.values()]

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    def anchor(self, which: str) -> Checkpoint:
        """theta_0: the instruct model (default) or the base model."""
        return {"instruct": self.instruct, "base": self.base}[which]

    @cached_property
    def tied_aliases(self) -> dict[str, str]:
        """{alias: canonical} for tied weights, judged by the instruct model's config."""
        return self.architecture.tied_aliases(self.instruct.config)

    @cached_property
    def nbytes(self) -> int:
        """Bytes of every tensor to merge in every model: what a pass over the family reads."""
        return sum(c.nbytes(n) for c in self.checkpoints for n in self.tensor_names)

    @cached_property
    def tensor_names(self) -> list[str]:
        """Tensors to merge, each once (tied aliases dropped), grouped by the anchor's shard."""
        ckpt = self.instruct
        names = [n for n in ckpt.names if n not in self.tied_aliases]
        return sorted(names, key=lambda n: (str(ckpt.files[n]), self.layer_sort_key(n), n))

    def layer_sort_key(self, name: str) -> int:
        layer = self.layer_of(name)
        return -1 if layer is None else layer

    def layer_of(self, name: str) -> int | None:
        return self.architecture.layer_of(name)

    def group_of(self, name: str) -> int | str:
        layer = self.layer_of(name)
        return REST if layer is None else layer

    @cached_property
    def num_layers(self) -> int:
        return _count_layers(self.architecture, self.base.names)

    def _check_compatible(self) -> Architecture:
        types = {c.config.get("model_type") for c in self.checkpoints}
        if len(types) != 1:
            listing = ", ".join(f"{c.role}={c.config.get('model_type')}" for c in self.checkpoints)
            raise CheckpointError(f"checkpoints have different model_type: {listing}")
        arch = architecture_for(types.pop())
        reference = self.base
        ref_names = set(reference.names)
        ref_layers = _count_layers(arch, reference.names)
        for other in self.checkpoints[1:]:
            names = set(other.names)
            tied = set(arch.tied_aliases(other.config))
            differing = sorted((ref_names ^ names) - tied)
            if differing:
                first = differing[0]
                where = f"{other.role} lacks" if first in ref_names else "base lacks"
                raise CheckpointError(
                    f"{other.role} ({other.path}) does not match base ({reference.path}): {where} tensor "
                    f"'{first}' (layers: base {ref_layers}, {other.role} {_count_layers(arch, other.names)})"
                )
            for name in sorted(ref_names & names):
                if reference.shape(name) != other.shape(name):
                    raise CheckpointError(
                        f"tensor '{name}' has shape {list(other.shape(name))} in {other.role} "
                        f"({other.path}) but {list(reference.shape(name))} in base ({reference.path})"
                    )
        if ref_layers == 0:
            raise CheckpointError(
                f"no tensor of {reference.path} matches the block prefixes of {arch.model_type} "
                f"({', '.join(arch.layer_prefixes)})"
            )
        return arch


def _count_layers(arch: Architecture, names: list[str]) -> int:
    layers = {arch.layer_of(n) for n in names} - {None}
    return max(layers) + 1 if layers else 0
