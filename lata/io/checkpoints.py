"""Checkpoints on disk: a lazy tensor reader, read-ahead and support files (writers: lata.io.shards).

A checkpoint is a Hugging Face model directory (or hub id) holding ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Tensors are zero-copy views of a private,
read-only-in-practice memory map of each file; nothing is loaded until asked for.

Every file is checked when the checkpoint is opened, before anything else reads it: a regular
file (``regular_file``), config.json and the index JSON objects of the expected shape
(``read_json``), each safetensors header as safetensors checks it (``read_header``). A malformed
one is refused with a one-line CheckpointError naming the file (and the tensor or key).

Memory: pages of a mapped file that are touched count in the process's resident set, so a
streaming reader that never lets go would end up "holding" every input it has read. ``release``
drops a tensor's pages from this process (``madvise(MADV_DONTNEED)``; the kernel's page cache
keeps them, so a later read costs a page fault, not a disk read) and ``prefetch`` maps a tensor
that is not in the page cache ahead (``madvise(MADV_POPULATE_READ)``, reading it from disk;
elsewhere it asks the kernel to read ahead, ``posix_fadvise(WILLNEED)``), so reading can
overlap compute. madvise and mincore are called through libc, without the GIL.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import reprlib
import shutil
import struct
import threading
import warnings
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy
import torch
from safetensors import safe_open

from lata.io.atomic import write_json_atomic
from lata.io.atomic import libc_function
from lata.io.digests import NotRegularFile, regular_stat

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
# Files fetched from the hub besides weights: config, generation config, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: the largest safetensors header read (safetensors' own limit, MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000
#: the largest JSON file read (config.json, an index, adapter_config.json)
MAX_JSON_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, malformed or incompatible; the message names it."""


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id downloaded (weights as safetensors only) to the HF cache.

    Decision: a string that exists locally, or starts with '/', '.', or '~', is a path; a string
    of the form ``owner/name`` that is not a local path is a hub id.
    """
    text = os.path.expanduser(str(path_or_id))
    local = Path(text)
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; a checkpoint is a model directory")
        return local
    if text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        raise CheckpointError(f"checkpoint directory {local} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, missing repo...
        raise CheckpointError(
            f"'{text}' is neither a local directory nor a hub model that could be fetched: {exc}"
        ) from exc


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (links followed); CheckpointError naming it otherwise.

    Called before a file is opened: opening a FIFO or a device blocks or reads forever."""
    path = Path(path)
    try:
        regular_stat(path)
    except NotRegularFile as exc:
        raise CheckpointError(f"{what} {exc}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise CheckpointError(f"cannot read {what} {path}: {why}") from None
    return path


def one_line(exc_or_text) -> str:
    """An exception's message (or a text) on one line, its whitespace runs made single spaces,
    at most 300 characters."""
    text = " ".join(str(exc_or_text).split())
    return text if len(text) <= 300 else text[:297] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def shown(value) -> str:
    """A value read from a file as a message shows it: Python's repr, shortened, on one line
    (nested and shared structures are cut off, never walked whole)."""
    return one_line(_REPR.repr(value))


def json_kind(value) -> str:
    """What a parsed JSON value is, for a message: 'a JSON list', 'a JSON number', ..."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "JSON null" if value is None else f"a JSON {kinds.get(type(value), type(value).__name__)}"


def quoted(name: str) -> str:
    """A name read from a file, quoted for a message ('name'; repr where it is not printable)."""
    return f"'{name}'" if isinstance(name, str) and name.isprintable() else shown(name)


def read_bounded(file: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; CheckpointError naming it otherwise."""
    file = regular_file(file, what)
    try:
        size = file.stat().st_size
        if size > limit:
            raise CheckpointError(f"{what} {file} has {size} bytes, more than the {limit} LATA reads from it")
        return file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {file}: {exc.strerror or one_line(exc)}") from None


def read_json(file: str | os.PathLike, what: str = "file"):
    """The value of a JSON file (UTF-8, -16 or -32); CheckpointError naming the file where it is
    not a regular file, holds more than ``MAX_JSON_BYTES``, or is not JSON."""
    raw = read_bounded(file, what, MAX_JSON_BYTES)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise CheckpointError(f"{file} is not valid JSON: {one_line(exc)}") from None


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
    total = _DTYPE_BYTES[dtype]
    for dim in shape:
        total *= dim
        if total > limit:
            return limit + 1
    return total


def read_header(file: str | os.PathLike, what: str = "safetensors file") -> dict[str, TensorEntry]:
    """The header of a safetensors file, checked: {tensor name: TensorEntry}, sorted by name.

    Checked as safetensors checks a file it opens, and before anything else reads the file: a
    regular file of at least 8 bytes, whose first 8 (little-endian) give a header length of at
    most ``MAX_HEADER_BYTES`` and at most the bytes that follow; a header that is a UTF-8 JSON
    object without repeated keys; ``__metadata__``, if there, an object of strings; every other
    entry an object with a ``dtype`` LATA knows (``_DTYPE_BYTES``), a ``shape`` of non-negative
    integers and ``data_offsets`` [a, b] with 0 <= a <= b <= the data's size and b - a the
    shape's bytes; the tensors' byte ranges, in order, tile the data (no gap, no overlap,
    nothing after the last). A tensor name that is not printable (a line break...) is refused.
    CheckpointError naming the file (and the tensor) otherwise; huge sizes are never allocated.
    """
    file = regular_file(file, what)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(f"cannot read {what} {file}: {reason}")

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
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, a repeated key
        raise fail(f"its header is not valid UTF-8 JSON ({one_line(exc)})") from None
    if not isinstance(header, dict):
        raise fail(f"its header is {json_kind(header)}, not a JSON object")
    base, data = 8 + length, size - 8 - length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise fail(f"its __metadata__ is {shown(info)}, not an object of strings")
            continue
        if not name.isprintable():
            raise fail(f"tensor name {shown(name)} is not printable")
        where = f"tensor '{name}'"
        if not isinstance(info, dict):
            raise fail(f"{where}: its entry is {json_kind(info)}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise fail(f"{where}: dtype {shown(dtype)} is not one LATA reads ({', '.join(_DTYPE_BYTES)})")
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
        entries[name] = TensorEntry(tuple(shape), dtype, base + start, base + end)
    covered = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start - base != covered:
            problem = "overlap those of another tensor" if entry.start - base < covered else \
                f"start at {entry.start - base}, but the tensors before end at {covered}"
            raise fail(f"tensor '{name}': its bytes {problem} (safetensors tiles the data)")
        covered = entry.end - base
    if covered != data:
        raise fail(f"its tensors hold {covered} bytes of data, but {data} follow the header (bytes appended?)")
    return dict(sorted(entries.items()))


def read_tensor(file: str | os.PathLike, name: str, entry: TensorEntry) -> torch.Tensor:
    """One tensor of a safetensors file (its ``read_header`` entry), read into fresh memory (a
    dtype torch cannot view is decoded by safetensors)."""
    dtype = _SAFETENSORS_TO_TORCH_ALL.get(entry.dtype)
    file = regular_file(file, "safetensors file")
    if dtype is None:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)
    raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    fd = os.open(file, os.O_RDONLY)
    try:
        _read_exactly(fd, raw.numpy(), entry.start)
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


class Checkpoint:
    """Lazy view of one checkpoint's tensors (names, shapes, dtypes, values)."""

    def __init__(self, path_or_id: str | os.PathLike, role: str = "model"):
        self.role = role
        self.source = str(path_or_id)
        self.path = resolve(path_or_id)
        self.config_file = self.path / "config.json"
        self.config = self._read_config()
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._bases: dict[Path, int | None] = {}
        self._lock = threading.Lock()
        self._file_headers: dict[Path, dict[str, TensorEntry]] = {}
        self.files = self._tensor_files()  # tensor name -> shard path
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # name -> (start, end) byte offsets in its file
        for file in sorted(set(self.files.values())):
            for name, entry in self._header(file).items():  # sorted by name within a file
                if self.files.get(name) == file:
                    self._headers[name] = (entry.shape, entry.dtype)
                    self._spans[name] = (entry.start, entry.end)
        missing = sorted(set(self.files) - set(self._headers))
        if missing:
            raise CheckpointError(
                f"{self.path / INDEX_FILE} lists tensor '{missing[0]}' in "
                f"{self.files[missing[0]].name}, which does not contain it"
            )

    def __repr__(self) -> str:
        return f"Checkpoint({self.role}: {self.path})"

    def _read_config(self) -> dict:
        """config.json, a JSON object (CheckpointError naming the file otherwise)."""
        config_path = self.config_file
        if not os.path.lexists(config_path):
            raise CheckpointError(f"{self.role} checkpoint {self.path} has no config.json")
        config = read_json(config_path, f"{self.role} config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} ({self.role}) is {json_kind(config)}, not a JSON object")
        return config

    def _tensor_files(self) -> dict[str, Path]:
        """tensor name -> its file: from the index (``read_index``), else every tensor of
        ``model.safetensors``."""
        index = self.path / INDEX_FILE
        if os.path.lexists(index):
            return read_index(index)
        single = self.path / SINGLE_FILE
        if os.path.lexists(single):
            return {name: single for name in self._header(single)}
        other = sorted(p.name for p in self.path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        hint = f" (found {', '.join(other)}; convert to safetensors)" if other else ""
        raise CheckpointError(f"{self.role} checkpoint {self.path} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _header(self, file: Path) -> dict[str, TensorEntry]:
        if file not in self._file_headers:
            self._file_headers[file] = read_header(file)
        return self._file_headers[file]

    def _open(self, file: Path):
        """safetensors' own reader of a file: only to decode a dtype torch cannot view."""
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(regular_file(file, "safetensors file")), framework="pt",
                                                device="cpu")
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"cannot read safetensors file {file}: {one_line(exc)}") from exc
        return self._handles[file]

    @property
    def names(self) -> list[str]:
        return list(self._headers)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[name][0]

    def dtype_name(self, name: str) -> str:
        """safetensors dtype string, e.g. 'F32', 'BF16'."""
        return self._headers[name][1]

    def torch_dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of a tensor, from the header (None for a dtype torch cannot view)."""
        return _SAFETENSORS_TO_TORCH_ALL.get(self.dtype_name(name))

    def is_float(self, name: str) -> bool:
        """Whether a tensor holds floating values (a dtype torch cannot view counts as one)."""
        dtype = self.torch_dtype(name)
        return dtype is None or dtype.is_floating_point

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * _DTYPE_BYTES[self.dtype_name(name)]

    def get(self, name: str) -> torch.Tensor:
        """One tensor (CPU, stored dtype).

        The tensor is a zero-copy view of the file's private memory map: writing to it changes
        this process's copy only (copy on write), never the file.
        """
        file = self.files[name]
        try:
            return self._view(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {file}: {exc}") from exc

    def refuse_non_finite(self, name: str, tensor: torch.Tensor | None = None) -> None:
        """Element-by-element check; raises naming file and tensor if any value is NaN or Inf."""
        tensor = self.get(name) if tensor is None else tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise CheckpointError(f"tensor '{name}' in {self.files[name]} ({self.role}) contains {bad} values")

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def _map(self, file: Path) -> mmap.mmap:
        fd = self._fd(file)
        with self._lock:
            if file not in self._maps:
                # ACCESS_COPY: a private mapping; pages are shared with the page cache until written
                self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                self._bases[file] = _address(self._maps[file])
            return self._maps[file]

    def read_later(self, name: str, pin: bool = False) -> tuple[torch.Tensor, list]:
        """One tensor (CPU, stored dtype) in fresh memory, and the calls that fill it by ``pread``,
        one per ``READ_PIECE`` bytes, which may run at once on different threads. Nothing goes
        through the memory map, so nothing needs ``release``. ``pin``: page-locked memory, which
        a GPU copies from asynchronously (needs a CUDA build of torch)."""
        file = self.files[name]
        dtype, shape = self.torch_dtype(name), self.shape(name)
        try:
            if dtype is None:  # an exotic dtype: decoded by safetensors, then copied
                view = self.get(name)
                return torch.empty(view.shape, dtype=view.dtype, pin_memory=pin).copy_(view), []
            start, end = self._spans[name]
            raw = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)
            fd, buffer = self._fd(file), raw.numpy()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {file}: {exc}") from exc

        def piece(lo: int, hi: int):
            def read():
                try:
                    _read_exactly(fd, buffer[lo:hi], start + lo)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor '{name}' from {file}: {exc}") from exc
            return read

        reads = [piece(lo, min(lo + READ_PIECE, end - start)) for lo in range(0, end - start, READ_PIECE)]
        return raw.view(dtype).view(shape), reads

    def _view(self, name: str) -> torch.Tensor:
        file = self.files[name]
        start, end = self._spans[name]
        dtype = self.torch_dtype(name)
        if dtype is None:
            return self._open(file).get_tensor(name)  # an exotic dtype: let safetensors decode it
        shape = self.shape(name)
        if end == start:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable buffer": the mapping is copy-on-write
            flat = torch.frombuffer(self._map(file), dtype=torch.uint8, count=end - start, offset=start)
        return flat.view(dtype).view(shape)

    def _regions(self, names) -> list[tuple[Path, int, int]]:
        return [(self.files[n], *self._spans[n]) for n in names if n in self._spans]

    def prefetch(self, names) -> None:
        """Map these tensors into the process now, reading what is not cached (blocks; the
        mapped pages count in RSS until ``release``). A tensor already in the page cache is
        skipped: mapping it ahead costs what the consumer's own page faults cost.

        Where the kernel cannot (before Linux 5.14), it is asked to read them into the page
        cache instead (asynchronous, no RSS).
        """
        for file, start, end in self._regions(names):
            if end <= start:
                continue
            mm = self._map(file)
            base = self._bases.get(file)
            if _resident(base, start, end) or _populate(mm, base, start, end):
                continue
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fds[file], start, end - start, os.POSIX_FADV_WILLNEED)

    def cached(self, names, samples: int | None = None) -> bool:
        """Whether every page of these tensors is in the page cache (False where it cannot tell);
        ``samples``: look at that many evenly spaced pages of each tensor instead (quicker)."""
        for file, start, end in self._regions(names):
            if end > start:
                self._map(file)
                if not _resident(self._bases.get(file), start, end, samples):
                    return False
        return True

    def release(self, names) -> None:
        """Drop these tensors' pages from this process's memory (the page cache keeps them).

        Views of them stay valid (a later access faults the pages back in from the file); only
        in-place changes made to such a view would be lost, and the engine never makes any.
        """
        for file, start, end in self._regions(names):
            mm = self._maps.get(file)
            if mm is None or end <= start or not hasattr(mm, "madvise"):
                continue
            _advise(mm, self._bases.get(file), start, end, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()  # a map still viewed by a live tensor is unmapped when the tensor goes
        self._bases.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # Linux 5.14+


def _pages(mm: mmap.mmap, start: int, end: int) -> tuple[int, int]:
    """(offset, length) of the whole pages of ``mm`` covering bytes [start, end)."""
    first = start - start % _PAGE
    return first, min(len(mm), -(-end // _PAGE) * _PAGE) - first


def _advise(mm: mmap.mmap, base: int | None, start: int, end: int, advice: int) -> None:
    """madvise the whole pages covering [start, end) of ``mm`` (mapped at ``base``).

    Decision: through libc by ctypes, which lets go of the GIL for the call (``mmap.madvise``
    holds it: a read-ahead that reads or maps hundreds of MB would stall every other thread's
    Python); ``mmap.madvise`` where libc's is not available. Raises OSError as madvise fails.
    """
    first, length = _pages(mm, start, end)
    if length <= 0:
        return
    if _madvise is None or base is None:
        mm.madvise(advice, first, length)
    elif _madvise(ctypes.c_void_p(base + first), ctypes.c_size_t(length), advice) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _populate(mm: mmap.mmap, base: int | None, start: int, end: int) -> bool:
    """Map [start, end) of ``mm`` into the process now (reading it if it is not cached), so the
    consumer does not fault page by page. False where the kernel cannot (older than 5.14)."""
    try:
        _advise(mm, base, start, end, _MADV_POPULATE_READ)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def _address(mm: mmap.mmap) -> int | None:
    """The address a map starts at (valid for as long as the map is open)."""
    try:
        anchor = ctypes.c_char.from_buffer(mm)
    except (TypeError, ValueError):
        return None
    address = ctypes.addressof(anchor)
    del anchor  # no export is kept: the map can still be closed
    return address


def _resident(base: int | None, start: int, end: int, samples: int | None = None) -> bool:
    """Whether every page of [start, end) of the map at ``base`` is in the page cache (one
    mincore call), or with ``samples``, that many evenly spaced pages. False when it cannot tell
    (no mincore; a file this user may not write, whose cached pages Linux does not report):
    reading ahead is then always asked for.
    """
    if _mincore is None or base is None or end <= start:
        return False
    first, last = start // _PAGE, (end - 1) // _PAGE
    spans = ([(first, last + 1)] if samples is None else
             [(p, p + 1) for p in sorted({first + (last - first) * i // max(1, samples - 1) for i in range(samples)})])
    for lo, hi in spans:
        vec = (ctypes.c_ubyte * (hi - lo))()
        if _mincore(ctypes.c_void_p(base + lo * _PAGE), ctypes.c_size_t((hi - lo) * _PAGE), vec) != 0:
            return False
        # bit 0 of each byte says "resident"; the other bits are reserved
        if not ((numpy.frombuffer(vec, dtype=numpy.uint8) & 1).all() if len(vec) > 64 else all(b & 1 for b in vec)):
            return False
    return True


_mincore = libc_function("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_madvise = libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


#: bytes per ``pread`` of ``Checkpoint.read_later``: pieces of a large tensor are read at once
READ_PIECE = 8 << 20


def _read_exactly(fd: int, out, offset: int) -> None:
    """Fill the buffer ``out`` from the file at ``offset`` (several reads where the kernel
    returns fewer bytes; the GIL is released while the kernel copies)."""
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view[:1 << 30]], offset)
        if n <= 0:
            raise EOFError(f"the file ends {len(view)} bytes early (truncated?)")
        view, offset = view[n:], offset + n


def finite_sum(x: torch.Tensor, step: int = 1 << 18) -> bool:
    """True if the float32 sum of ``x`` is finite (then every value is); summed by slices, which
    is much faster than one whole-tensor sum with a dtype change."""
    flat = x.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), step):
        total += float(flat[start:start + step].sum(dtype=torch.float32))
    return math.isfinite(total)


#: bytes per element of each safetensors dtype LATA reads (those of whole bytes; the ones
#: missing from ``_SAFETENSORS_TO_TORCH_ALL`` are decoded by safetensors)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U64": 8, "U32": 4, "U16": 2, "C64": 8,
                "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                         "F64": torch.float64}
_SAFETENSORS_TO_TORCH_ALL = {**_SAFETENSORS_TO_TORCH, "I64": torch.int64, "I32": torch.int32,
                             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_TORCH_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_TO_TORCH_ALL.items()}


def torch_dtype_of(safetensors_dtype: str) -> torch.dtype | None:
    return _SAFETENSORS_TO_TORCH.get(safetensors_dtype)


PREFETCH_BYTES = 512 << 20  # how far the read-ahead thread runs ahead of its consumer


class Prefetcher:
    """Reads ahead of a consumer that walks a fixed schedule of tensors.

    ``schedule[i]`` lists the (checkpoint, tensor) pairs that step i reads. A background thread
    asks the kernel for the bytes of the coming steps (``Checkpoint.prefetch``) while the
    consumer computes, staying at most ``budget`` bytes ahead of it; ``advance(i)`` says the
    consumer is at step i. Prefetching never changes what is read, only when: results are
    identical with it on or off.

    Decision: when every scheduled tensor is in the page cache already, no thread is started:
    mapping pages ahead then costs what the consumer's page faults would, and the extra thread
    only competes with the compute (slower on a warm cache: docs/performance.md).
    """

    def __init__(self, schedule: list[list[tuple["Checkpoint", str]]], budget: int = PREFETCH_BYTES,
                 enabled: bool = True):
        self.schedule = schedule
        self.sizes = [sum(c.nbytes(n) for c, n in step) for step in schedule]
        self.budget = budget
        self._position = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread = None
        if enabled and schedule and not all(c.cached([n], samples=2) for step in schedule for c, n in step):
            self._thread = threading.Thread(target=self._run, name="lata-prefetch", daemon=True)
            self._thread.start()

    def advance(self, position: int) -> None:
        with self._cond:
            self._position = position
            self._cond.notify()

    def _run(self) -> None:
        ahead = 0  # bytes of steps [position, j) already asked for
        j = 0
        while j < len(self.schedule):
            with self._cond:
                while not self._stop and j > self._position and ahead + self.sizes[j] > self.budget:
                    self._cond.wait()
                    ahead = sum(self.sizes[max(self._position, 0):j])
                if self._stop:
                    return
                if j < self._position:  # the consumer overtook us: skip what it has read
                    j = self._position
                    ahead = 0
                    continue
            try:
                for ckpt, name in self.schedule[j]:
                    ckpt.prefetch([name])
                if self._position > j:  # the consumer finished step j meanwhile: unmap it again
                    for ckpt, name in self.schedule[j]:
                        ckpt.release([name])
            except OSError:
                return  # prefetching is advisory; the consumer reads whatever happens here
            ahead += self.sizes[j]
            j += 1

    def close(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def support_files(folder: Path) -> list[Path]:
    """The files a merged checkpoint takes from its anchor: everything at the top of ``folder``
    but weights, the index, READMEs and hidden files (config, generation config, tokenizer,
    chat template, custom code), sorted."""
    return [item for item in sorted(Path(folder).iterdir())
            if not item.is_dir() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != INDEX_FILE
            and not item.name.lower().startswith("readme") and not item.name.startswith(".")]


def copy_support_files(source: Path, target: Path, dtype: str | None = None) -> None:
    """Copy config, generation config and tokenizer files (everything but weights) from ``source``.

    ``dtype`` (e.g. 'bfloat16') is written into config.json's dtype key(s).
    """
    for item in support_files(source):
        shutil.copy2(item, target / item.name)
    config_path = target / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        write_json_atomic(config_path, config)

