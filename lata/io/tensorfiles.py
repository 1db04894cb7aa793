"""Safetensors files: the checked header reader, one-tensor reads, the shard index, dtype tables.

A safetensors file is 8 bytes giving a header length, a JSON header naming each tensor's dtype,
shape and byte span, then the tensors' bytes. ``read_header`` checks a file as safetensors
checks one it opens, before anything else reads it; ``read_index`` checks the
``model.safetensors.index.json`` of a sharded checkpoint. A malformed file is refused with a
one-line CheckpointError naming it (and the tensor or key).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open

from lata.io.files import CheckpointError, json_kind, one_line, quoted, read_json, regular_file, shown
from lata.io.pagecache import read_exactly

#: a checkpoint's weights in one file, or in shards listed by an index
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: weight files of any format (a checkpoint that has none in safetensors is refused naming them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
#: the largest safetensors header read (safetensors' own limit, MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000

#: bytes per element of each safetensors dtype LATA reads (those of whole bytes; the ones
#: missing from ``SAFETENSORS_TO_TORCH`` are decoded by safetensors)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U64": 8, "U32": 4, "U16": 2, "C64": 8,
               "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}

#: output dtypes by the names a config gives them
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the floating safetensors dtypes LATA merges in
_FLOAT_SAFETENSORS_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                               "F64": torch.float64}
#: every safetensors dtype torch can view the bytes of
SAFETENSORS_TO_TORCH = {**_FLOAT_SAFETENSORS_TO_TORCH, "I64": torch.int64, "I32": torch.int32,
                        "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}


def torch_dtype_of(safetensors_dtype: str) -> torch.dtype | None:
    """The torch dtype of a floating safetensors dtype LATA merges in (None for any other)."""
    return _FLOAT_SAFETENSORS_TO_TORCH.get(safetensors_dtype)


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header: its shape, dtype string and byte span [start, end) in
    the file (absolute offsets)."""

    shape: tuple[int, ...]
    dtype: str
    start: int
    end: int


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted(k for k in set(keys) if keys.count(k) > 1)[0]
        raise ValueError(f"the key {quoted(twice)} appears twice")
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _needed_bytes(shape: list[int], dtype: str, limit: int) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``; past ``limit``, some number above it (a
    product of huge dimensions is never computed)."""
    if 0 in shape:
        return 0
    total = DTYPE_BYTES[dtype]
    for dim in shape:
        total *= dim
        if total > limit:
            return limit + 1
    return total


Failure = Callable[[str], CheckpointError]


def read_header(file: str | os.PathLike, what: str = "safetensors file") -> dict[str, TensorEntry]:
    """The header of a safetensors file, checked: {tensor name: TensorEntry}, sorted by name.

    Checked as safetensors checks a file it opens, and before anything else reads the file: a
    regular file of at least 8 bytes, whose first 8 (little-endian) give a header length of at
    most ``MAX_HEADER_BYTES`` and at most the bytes that follow; a header that is a UTF-8 JSON
    object without repeated keys; ``__metadata__``, if there, an object of strings; every other
    entry an object with a ``dtype`` LATA knows (``DTYPE_BYTES``), a ``shape`` of non-negative
    integers and ``data_offsets`` [a, b] with 0 <= a <= b <= the data's size and b - a the
    shape's bytes; the tensors' byte ranges, in order, tile the data (no gap, no overlap,
    nothing after the last). A tensor name that is not printable (a line break...) is refused.
    CheckpointError naming the file (and the tensor) otherwise; huge sizes are never allocated.
    """
    file = regular_file(file, what)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"cannot read {what} {file}: {reason}")

    raw, size = _header_bytes(file, fail)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, a repeated key
        raise fail(f"its header is not valid UTF-8 JSON ({one_line(exc)})") from None
    if not isinstance(header, dict):
        raise fail(f"its header is {json_kind(header)}, not a JSON object")
    base, data = 8 + len(raw), size - 8 - len(raw)
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise fail(f"its __metadata__ is {shown(info)}, not an object of strings")
            continue
        entries[name] = _entry(name, info, base, data, fail)
    _check_tiling(entries, base, data, fail)
    return dict(sorted(entries.items()))


def _header_bytes(file: Path, fail: Failure) -> tuple[bytes, int]:
    """(the header's bytes, the file's size), its 8-byte length checked against both limits."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(f"it has {size} bytes, fewer than the 8 of the header length (truncated?)")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise fail(f"its first 8 bytes give a header length of {length} bytes, more than the "
                           f"{MAX_HEADER_BYTES} safetensors allows (not a safetensors file?)")
            if length > size - 8:
                raise fail(f"its first 8 bytes give a header length of {length} bytes, but {size - 8} follow "
                           f"(truncated, or not a safetensors file?)")
            raw = f.read(length)
    except OSError as exc:
        raise fail(exc.strerror or one_line(exc)) from None
    if len(raw) != length:
        raise fail(f"the file ends inside its {length}-byte header (truncated?)")
    return raw, size


def _entry(name: str, info, base: int, data: int, fail: Failure) -> TensorEntry:
    """One tensor's header entry, checked against the ``data`` bytes that follow the header
    (which starts them at ``base``)."""
    if not name.isprintable():
        raise fail(f"tensor name {shown(name)} is not printable")
    where = f"tensor '{name}'"
    if not isinstance(info, dict):
        raise fail(f"{where}: its entry is {json_kind(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise fail(f"{where}: dtype {shown(dtype)} is not one LATA reads ({', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"{where}: shape {shown(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise fail(f"{where}: data_offsets {shown(offsets)} is not a pair of non-negative integers")
    start, end = offsets
    if not start <= end <= data:
        raise fail(f"{where}: data_offsets {shown(offsets)} lie outside the {data} bytes of data (truncated?)")
    needed = _needed_bytes(shape, dtype, 1 << 64)
    if end - start != needed:
        needs = "more than 2**64 bytes" if needed > 1 << 64 else f"{needed} bytes"
        raise fail(f"{where}: data_offsets {shown(offsets)} hold {end - start} bytes, but shape {shown(shape)} "
                   f"of {dtype} needs {needs}")
    return TensorEntry(tuple(shape), dtype, base + start, base + end)


def _check_tiling(entries: dict[str, TensorEntry], base: int, data: int, fail: Failure) -> None:
    """Refuse byte ranges that, in order, leave a gap, overlap, or stop short of the data's end."""
    covered = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start - base != covered:
            problem = "overlap those of another tensor" if entry.start - base < covered else \
                f"start at {entry.start - base}, but the tensors before end at {covered}"
            raise fail(f"tensor '{name}': its bytes {problem} (safetensors tiles the data)")
        covered = entry.end - base
    if covered != data:
        raise fail(f"its tensors hold {covered} bytes of data, but {data} follow the header (bytes appended?)")


def read_tensor(file: str | os.PathLike, name: str, entry: TensorEntry) -> torch.Tensor:
    """One tensor of a safetensors file (its ``read_header`` entry), read into fresh memory (a
    dtype torch cannot view is decoded by safetensors)."""
    dtype = SAFETENSORS_TO_TORCH.get(entry.dtype)
    file = regular_file(file, "safetensors file")
    if dtype is None:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)
    raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    fd = os.open(file, os.O_RDONLY)
    try:
        read_exactly(fd, raw.numpy(), entry.start)
    finally:
        os.close(fd)
    return raw.view(dtype).view(entry.shape)


def read_index(index: Path) -> dict[str, Path]:
    """tensor name -> shard file of a safetensors index: a JSON object whose ``weight_map`` maps
    names to shard file names inside the checkpoint, each a regular file; CheckpointError naming
    the index otherwise.

    Decision: a shard name is checked as a name (not absolute, no '..' component), never by
    where it resolves: in the Hugging Face cache every file of a snapshot is a link into
    ../../blobs."""
    folder = index.parent
    data = read_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        kind = "it has no 'weight_map' object" if isinstance(data, dict) else f"it is {json_kind(data)}"
        raise CheckpointError(f"{index} is not a valid safetensors index: {kind}")
    files = {}
    for name, shard in weight_map.items():
        if not name.isprintable():
            raise CheckpointError(f"{index} lists tensor name {shown(name)}, which is not printable")
        if not isinstance(shard, str):
            raise CheckpointError(f"{index} is not a valid safetensors index: tensor '{name}' maps to "
                                  f"{shown(shard)}, not a shard file name")
        parts = PurePosixPath(shard).parts
        if not shard.isprintable() or PurePosixPath(shard).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{index} names shard {shown(shard)} (tensor '{name}'), which is not a "
                                  f"file inside the checkpoint: a shard name is a printable relative path "
                                  f"without '..'")
        files[name] = folder / shard
    for shard in sorted(set(files.values())):
        if not os.path.lexists(shard):
            raise CheckpointError(f"{index} names shard {shard.name}, which is missing")
        regular_file(shard, "shard")
    return files
