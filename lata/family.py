"""A family of checkpoints (base, instruct, experts) opened lazily and checked for compatibility.

Everything that can be known from headers alone is checked here, before any tensor is read or
any output written: same model_type, same tensor names, same shapes, same layer count.

The vocabulary policy lives here too. Checkpoints may differ in their number of embedding rows
(an expert trained with added tokens, or a truncated one): a tensor outside the blocks whose
first dimension is each checkpoint's embedding row count is a vocabulary tensor; every method
merges the rows all the family's checkpoints share (``shared_rows``: token ids are rows, the
shared ids must be the same tokens wherever tokenizer.json says), and the output has the
vocabulary ``vocab`` names: ``anchor`` (the checkpoint the delta is added to: its rows beyond
the shared ones are its own) or an expert (its tokenizer and config, its rows beyond the shared
ones). Rows only other checkpoints have are not merged (``vocab_notes`` says which and how many).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import torch

from lata.architectures import Architecture, architecture_of, config_value, model_type_of
from lata.config import ANCHOR_VOCAB, ROLES, check_vocab, role_map
from lata.io.adapters import open_checkpoint
from lata.io.checkpoints import Checkpoint
from lata.io.files import CheckpointError, read_json


@dataclass
class Family:
    base: Checkpoint
    instruct: Checkpoint
    experts: dict[str, Checkpoint]
    #: the checkpoint the merged vectors are added to (``model.target``); None: the anchor
    target: Checkpoint | None = None
    #: whose vocabulary the output has: ``anchor`` or an expert's name (``model.vocab``)
    vocab: str = ANCHOR_VOCAB
    architecture: Architecture = field(init=False)
    #: tensors with one row per token whose row counts differ between checkpoints
    vocab_tensors: frozenset = field(default=frozenset(), init=False, repr=False)
    #: the rows every checkpoint has, where ``vocab_tensors`` is not empty
    shared_rows: int | None = field(default=None, init=False, repr=False)
    #: exact selections over this family's vectors, kept while it is open so that the points of
    #: a sweep share them (TIES thresholds: lata.engine); keys name what was selected
    selections: dict[tuple, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.experts:
            raise CheckpointError("a family needs at least one expert")
        for name in self.experts:
            if name in ROLES:
                raise CheckpointError(f"expert name '{name}' is reserved for a family role")
        self._check_vocab_choice()
        self.architecture = self._check_compatible()

    @classmethod
    def open(cls, base: str | os.PathLike, instruct: str | os.PathLike,
             experts: dict[str, str | os.PathLike], target: str | os.PathLike | None = None,
             vocab: str = ANCHOR_VOCAB) -> "Family":
        """Open every checkpoint (headers only) and check they can be merged.

        An expert (or the target) may be a LoRA adapter over the instruct model
        (``lata.io.adapters``).

        ``target``: where the merged vectors are added (None: the anchor); a path that is one of
        the family's own is that role's checkpoint. ``vocab``: whose vocabulary the output has
        (``anchor``, or an expert's name), where the checkpoints' vocabularies differ.
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
        return cls(**family, vocab=vocab)

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
                    self._resized(arch, name, reference, other)
        if ref_layers == 0:
            raise CheckpointError(
                f"no tensor of {reference.path} matches the block prefixes of {arch.model_type} "
                f"({', '.join(arch.layer_prefixes)})"
            )
        for ckpt in inputs:
            _check_config(arch, ckpt)
        self._check_dtypes()
        if self.vocab_tensors:
            self.shared_rows = min(_vocab_rows(arch, c) for c in inputs)
            _check_shared_tokens(inputs, self.shared_rows)
        return arch

    def _check_vocab_choice(self) -> None:
        check_vocab(self.vocab, list(self.experts), self.target is not None)
        if self.vocab != ANCHOR_VOCAB and getattr(self.experts[self.vocab], "instruct", None) is not None:
            raise CheckpointError(f"model.vocab={self.vocab}: expert '{self.vocab}' is a LoRA adapter; the output's "
                                  f"vocabulary comes from a whole checkpoint (its config and tokenizer)")

    def _resized(self, arch: Architecture, name: str, reference: Checkpoint, other: Checkpoint) -> None:
        """Accept a shape difference in the rows of a vocabulary tensor (one row per token, outside
        the blocks), else refuse naming the tensor and both shapes."""
        a, b = list(reference.shape(name)), list(other.shape(name))
        rows = {c.role: _vocab_rows(arch, c) for c in (reference, other)}
        if (arch.layer_of(name) is None and len(a) == len(b) and a[1:] == b[1:] and None not in rows.values()
                and a[0] == rows[reference.role] and b[0] == rows[other.role]):
            self.vocab_tensors = self.vocab_tensors | {name}
            return
        why = (" (only the rows of a tensor with one row per token, outside the blocks, may differ)"
               if a[1:] == b[1:] else "")
        raise CheckpointError(f"tensor '{name}' has shape {b} in {other.role} ({other.path}) but {a} in "
                              f"{reference.role} ({reference.path}){why}")

    def vocab_checkpoint(self, anchor: str) -> Checkpoint:
        """The checkpoint whose vocabulary, tokenizer and config the output has."""
        return self.output_base(anchor) if self.vocab == ANCHOR_VOCAB else self.experts[self.vocab]

    def vocab_notes(self, anchor: str) -> list[str]:
        """What the vocabulary policy does with rows not all checkpoints share, one line each."""
        if not self.vocab_tensors:
            return []
        arch, shared, source = self.architecture, self.shared_rows, self.vocab_checkpoint(anchor)
        notes = [f"{c.role} has {_vocab_rows(arch, c) - shared} embedding rows beyond the {shared} every model "
                 f"shares: they are not merged (model.vocab={self.vocab})"
                 for c in self.inputs if c is not source and _vocab_rows(arch, c) > shared]
        extra = _vocab_rows(arch, source) - shared
        if extra:
            notes.append(f"the output has {source.role}'s vocabulary: its {extra} rows beyond the {shared} shared ones "
                         f"are {source.role}'s own, unmerged")
        return notes

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
    tied = arch.ties(ckpt.config)
    for alias, embedding in arch.tied_weights:
        vocab = config_value(ckpt.config, "vocab_size")
        if embedding in ckpt.files and vocab is not None and ckpt.shape(embedding)[0] != vocab:
            raise CheckpointError(f"{where} says vocab_size={vocab}, but tensor '{embedding}' has "
                                  f"{ckpt.shape(embedding)[0]} rows")
        if not tied and embedding in ckpt.files and alias not in ckpt.files:
            raise CheckpointError(f"{where} says tie_word_embeddings=false, but there is no tensor '{alias}' "
                                  f"(a model loaded by this config would get a random '{alias}')")


def _vocab_rows(arch: Architecture, ckpt: Checkpoint) -> int | None:
    """The checkpoint's number of token rows: its input embedding's first dimension."""
    for _, embedding in arch.tied_weights:
        if embedding in ckpt.files:
            return ckpt.shape(embedding)[0]
    return None


def _token_ids(ckpt: Checkpoint) -> dict[int, str] | None:
    """id -> token of the checkpoint's tokenizer.json (its model's vocabulary and added tokens),
    or None where it has none."""
    file = getattr(ckpt, "path", None)
    file = None if file is None else file / "tokenizer.json"
    if file is None or not file.is_file():
        return None
    data = read_json(file, "tokenizer file")
    vocab = (data.get("model") or {}).get("vocab") if isinstance(data, dict) else None
    ids = {i: t for t, i in vocab.items()} if isinstance(vocab, dict) else {}
    for added in data.get("added_tokens") or [] if isinstance(data, dict) else []:
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            ids[added["id"]] = added.get("content")
    return ids


def _check_shared_tokens(inputs: list[Checkpoint], shared: int) -> None:
    """Rows are merged by token id: where two checkpoints' tokenizer.json give a shared id two
    different tokens, their vocabularies differ in a way no row policy covers."""
    known = [(c, ids) for c in inputs if (ids := _token_ids(c)) is not None]
    if len(known) < 2:
        return
    first, ids0 = known[0]
    for other, ids in known[1:]:
        for i in range(shared):
            if ids0.get(i) != ids.get(i):
                raise CheckpointError(
                    f"token id {i} is {ids0.get(i)!r} in {first.role} ({first.path}) but {ids.get(i)!r} in "
                    f"{other.role} ({other.path}): LATA merges embedding rows by token id, so the ids every "
                    f"model shares must be the same tokens (a reordered vocabulary cannot be merged)")


def _count_layers(arch: Architecture, names: list[str]) -> int:
    layers = {arch.layer_of(n) for n in names} - {None}
    return max(layers) + 1 if layers else 0
