"""A family of checkpoints (base, instruct, experts) opened lazily and checked for compatibility.

Everything that can be known from headers alone is checked here, before any tensor is read or
any output written: same model_type, same tensor names, same shapes, same layer count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import torch

from lata.architectures import Architecture, architecture_of, config_value, model_type_of
from lata.config import ROLES, role_map
from lata.io.adapters import open_checkpoint
from lata.io.checkpoints import Checkpoint
from lata.io.files import CheckpointError



@dataclass
class Family:
    base: Checkpoint
    instruct: Checkpoint
    experts: dict[str, Checkpoint]
    #: the checkpoint the merged vectors are added to (``model.target``); None: the anchor
    target: Checkpoint | None = None
    architecture: Architecture = field(init=False)
    #: exact selections over this family's vectors, kept while it is open so that the points of
    #: a sweep share them (TIES thresholds: lata.engine); keys name what was selected
    selections: dict[tuple, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.experts:
            raise CheckpointError("a family needs at least one expert")
        for name in self.experts:
            if name in ROLES:
                raise CheckpointError(f"expert name '{name}' is reserved for a family role")
        self.architecture = self._check_compatible()

    @classmethod
    def open(cls, base: str | os.PathLike, instruct: str | os.PathLike,
             experts: dict[str, str | os.PathLike], target: str | os.PathLike | None = None) -> "Family":
        """Open every checkpoint (headers only) and check they can be merged.

        An expert (or the target) may be a LoRA adapter over the instruct model
        (``lata.io.adapters``).

        ``target``: where the merged vectors are added (None: the anchor); a path that is one of
        the family's own is that role's checkpoint.
        """
        theta_base = Checkpoint(base, role="base")  # opened (and fetched) in this order
        theta_inst = Checkpoint(instruct, role="instruct")
        family = dict(base=theta_base, instruct=theta_inst,
                      experts={name: open_checkpoint(path, f"expert '{name}'", theta_inst)
                               for name, path in experts.items()})
        if target is not None:
            own = {str(c.source): c for c in role_map(family["base"], family["instruct"], family["experts"]).values()}
            same = own.get(str(target))
            family["target"] = same if same is not None else open_checkpoint(target, "target", theta_inst)
        return cls(**family)

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """base, instruct and the experts, in that order (the vectors are differences of these)."""
        return [self.base, self.instruct, *self.experts.values()]

    @property
    def inputs(self) -> list[Checkpoint]:
        """Every checkpoint a merge reads: ``checkpoints`` and the target, once each."""
        extra = [self.target] if self.target is not None and all(self.target is not c for c in self.checkpoints) else []
        return self.checkpoints + extra

    def output_base(self, anchor: str) -> Checkpoint:
        """The checkpoint the merged vectors are added to: the target, else the anchor. The merged
        checkpoint takes its dtypes, config and tokenizer."""
        return self.target if self.target is not None else self.anchor(anchor)

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)

    def anchor(self, which: str) -> Checkpoint:
        """theta_0: the instruct model (default) or the base model."""
        return role_map(self.base, self.instruct, {})[which]

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

    @cached_property
    def num_layers(self) -> int:
        return _count_layers(self.architecture, self.base.names)

    def _check_compatible(self) -> Architecture:
        inputs = self.inputs
        types = {model_type_of(c.config, f"{c.config_file} ({c.role})") for c in inputs}
        if len(types) != 1:
            listing = ", ".join(f"{c.role}={t if t.isprintable() else repr(t)}"
                                for c, t in ((c, c.config["model_type"]) for c in inputs))
            kinds = [c.config["model_type"] for c in inputs]
            usual = max(kinds, key=lambda t: (kinds.count(t), t == self.instruct.config["model_type"]))
            odd = ", ".join(f"{c.role}'s in {c.config_file}" for c, t in zip(inputs, kinds) if t != usual)
            raise CheckpointError(f"checkpoints have different model_type: {listing} ({odd})")
        types.pop()
        arch = architecture_of(self.base.config, self.base.names, where=f"{self.base.config_file} (base)")
        for ckpt in inputs:
            arch.check_config(ckpt.config, f"{ckpt.config_file} ({ckpt.role})")
        reference = self.base
        ref_names = set(reference.names)
        ref_layers = _count_layers(arch, reference.names)
        for other in inputs[1:]:
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
        for ckpt in inputs:
            _check_config(arch, ckpt)
        self._check_dtypes()
        return arch

    def _check_dtypes(self) -> None:
        """A tensor that is not floating point (integer, boolean) in any role is merged by no
        method: it must have the same dtype and bytes in every role, and is then copied.

        Decision: such tensors are compared here, when the family is opened (reading their bytes:
        they are buffers and tables, small next to the weights), so a mismatch is refused
        before any output; a floating tensor may differ in dtype between roles (every method
        computes in float32)."""
        inputs = self.inputs
        for name in self.base.names:
            holders = [c for c in inputs if name in c.files]
            kinds = [c.torch_dtype(name) for c in holders]
            odd = [c for c, kind in zip(holders, kinds) if kind is not None and not kind.is_floating_point]
            if not odd:
                continue
            first = odd[0]
            for other in holders:
                if other.dtype_name(name) != first.dtype_name(name):
                    raise CheckpointError(
                        f"tensor '{name}' is {first.dtype_name(name)} in {first.role} ({first.path}) but "
                        f"{other.dtype_name(name)} in {other.role} ({other.path}): LATA merges floating-point "
                        f"tensors only, and an integer or boolean tensor must be the same in every model")
                if not torch.equal(other.get(name), first.get(name)):
                    raise CheckpointError(
                        f"tensor '{name}' ({first.dtype_name(name)}, not floating point) differs between "
                        f"{first.role} ({first.path}) and {other.role} ({other.path}): LATA merges floating-point "
                        f"tensors only, and an integer or boolean tensor must be the same in every model")


def _check_config(arch: Architecture, ckpt: Checkpoint) -> None:
    """config.json agrees with the tensors (layer count, vocabulary size, tied embeddings): the
    anchor's config is copied into the merged checkpoint, and a model loads by it."""
    where = f"{ckpt.role} ({ckpt.config_file})"
    layers, counted = arch.num_layers(ckpt.config), _count_layers(arch, ckpt.names)
    if layers is not None and layers != counted:
        raise CheckpointError(f"{where} says {arch.num_layers_key}={layers}, but its tensors hold {counted} layers")
    tied = ckpt.config.get("tie_word_embeddings", arch.tie_word_embeddings_default)
    for alias, embedding in arch.tied_weights:
        vocab = config_value(ckpt.config, "vocab_size")
        if embedding in ckpt.files and vocab is not None and ckpt.shape(embedding)[0] != vocab:
            raise CheckpointError(f"{where} says vocab_size={vocab}, but tensor '{embedding}' has "
                                  f"{ckpt.shape(embedding)[0]} rows")
        if not tied and embedding in ckpt.files and alias not in ckpt.files:
            raise CheckpointError(f"{where} says tie_word_embeddings=false, but there is no tensor '{alias}' "
                                  f"(a model loaded by this config would get a random '{alias}')")


def _count_layers(arch: Architecture, names: list[str]) -> int:
    layers = {arch.layer_of(n) for n in names} - {None}
    return max(layers) + 1 if layers else 0
