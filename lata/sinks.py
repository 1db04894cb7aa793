"""Where merged tensors go: a checkpoint directory, a state dict, a loaded model in place.

``merge_to_dir`` holds the output policy: the target directory is checked before any tensor is
read (``lata.io.outputs``: never an input, ``overwrite`` false / true / "force", writable, room
for the output) and locked against other writers; the checkpoint is built in a temporary
sibling directory (``lata.io.atomic``), sharded as it streams (``lata.io.shards``: each tensor
written as soon as it is merged, from a writer thread, into reused output buffers), and renamed
into place only when whole, its marker ``lata_merge.json`` written last.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from lata.accel.compute import page_aligned_empty
from lata.config import parse_size
from lata.engine import iter_merged
from lata.io.atomic import atomic_directory
from lata.io.outputs import check_space, check_target, write_marker, writer_lock
from lata.io.shards import StreamingShardWriter, copy_support_files
from lata.io.tensorfiles import torch_dtype_of
from lata.plan import MergePlan, output_bytes, output_entries


class _BufferPool:
    """Output buffers handed back by the writer once written, reused for later tensors of the
    same shape and dtype (fresh large allocations cost a page fault per page). A shape's buffers
    are dropped when no tensor still to come has it."""

    def __init__(self, entries: list[tuple[str, tuple[int, ...], torch.dtype]], pin: bool = False):
        self.pin = pin  # page-locked buffers, which a GPU copies into asynchronously
        self._left: dict[tuple, int] = {}
        for _, shape, dtype in entries:
            key = (tuple(shape), dtype)
            self._left[key] = self._left.get(key, 0) + 1
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        with self._lock:
            self._left[key] = self._left.get(key, 1) - 1
            free = self._free.get(key)
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True) if self.pin else page_aligned_empty(shape, dtype)

    def give(self, tensor: torch.Tensor) -> None:
        key = (tuple(tensor.shape), tensor.dtype)
        with self._lock:
            if self._left.get(key, 0) > 0:
                self._free.setdefault(key, []).append(tensor)
            else:
                self._free.pop(key, None)


def merge_state_dict(plan: MergePlan, out_dtype: str | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """The merged model as a state dict (holds the whole output in memory: for small models)."""
    return dict(iter_merged(plan, out_dtype, progress))


def merge_to_dir(plan: MergePlan, out_dir: str | os.PathLike, *, out_dtype: str | None = None,
                 overwrite: bool | str = False, shard_size: str | int = "2GB", progress: bool = True,
                 record: dict | None = None, protected: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write the merged model as a sharded safetensors HF checkpoint, atomically.

    Config, generation config, tokenizer and chat template come from the checkpoint whose
    vocabulary the output has (``MergePlan.vocab_source``: the anchor, or the target where the
    family has one, unless ``model.vocab`` names an expert). Before any tensor is
    read, ``out_dir`` is checked (``lata.io.outputs``: never an input, ``overwrite`` false / true /
    "force", writable, room for the output) and locked against other writers. The checkpoint is
    built in a temporary sibling directory and renamed to ``out_dir`` only when whole; shards
    are planned from the headers and each tensor is written as soon as it is merged, and
    checked to be finite. The marker ``lata_merge.json`` (what was merged, ``record`` and every
    file's size) is written last.
    """
    max_bytes = parse_size(shard_size, key="shard_size")
    entries = output_entries(plan.family, plan.anchor, out_dtype)
    inputs = {c.role: c.path for c in plan.family.inputs}

    def check(path: Path) -> Path:
        return check_target(path, overwrite=overwrite, inputs=inputs, protected=protected)

    out = check(out_dir)
    check_space(out, output_bytes(plan.family, entries=entries))
    with writer_lock(out), atomic_directory(out, check=check) as tmp:
        pool = _BufferPool(entries, pin=plan.is_staged and torch.device(plan.device).type == "cuda")
        writer = StreamingShardWriter(tmp, entries, max_bytes, threaded=plan.write_behind, direct=plan.direct_io,
                                      on_written=pool.give)
        try:
            for name, tensor in iter_merged(plan, out_dtype, progress, buffers=pool):
                writer.add(name, tensor)
            writer.finish()
            digests = writer.digests
        except BaseException:
            writer.abort()
            raise
        dtype_name = out_dtype or _anchor_dtype_name(plan)
        copy_support_files(plan.vocab_source.path, tmp, dtype=dtype_name)
        write_marker(tmp, {"written_by": "lata", "method": plan.method.name, "anchor": plan.anchor,
                           "target": None if plan.family.target is None else plan.family.target.source,
                           "inputs": {c.role: c.source for c in plan.family.inputs}, "vocab": plan.family.vocab, "lams": plan.lams,
                           "weights": plan.weights, "rest_weight": plan.rest_weight, "dtype": dtype_name,
                           "shard_size": max_bytes, **(record or {})}, digests)
    return out


def _anchor_dtype_name(plan: MergePlan) -> str | None:
    """The dtype of the output base's floating tensors, as config.json spells it."""
    anchor = plan.output_base
    for name in plan.family.tensor_names:
        dtype = torch_dtype_of(anchor.dtype_name(name))
        if dtype is not None:
            return str(dtype).removeprefix("torch.")
    return None


def merge_into_model(plan: MergePlan, model: torch.nn.Module, progress: bool = False) -> torch.nn.Module:
    """Copy the merged tensors into an already-loaded model, in place (no save, no reload).

    Tensors keep the model's own dtype and device (a model on the accelerator the plan merges on
    takes them there, without a round trip through host memory); tied weights are updated once,
    via their canonical tensor. Checkpoint names are matched to the model's state dict directly or under
    the model's ``base_model_prefix`` (GPT-2 style checkpoints).
    """
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    # a model on an accelerator takes the merged tensors there, never through host memory
    there = torch.device(plan.device).type != "cpu" and all(t.device.type != "cpu" for t in state.values())
    with torch.no_grad():
        for name, tensor in iter_merged(plan, None, progress, keep_on_device=there):
            key = name if name in state else f"{prefix}.{name}"
            if key not in state:
                raise KeyError(f"merged tensor '{name}' has no counterpart in the model's state dict")
            target = state[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor '{name}': model has shape {list(target.shape)}, merge gives {list(tensor.shape)}")
            target.data.copy_(tensor.to(target.device, target.dtype))
    return model


__all__ = ["merge_state_dict", "merge_to_dir", "merge_into_model"]
