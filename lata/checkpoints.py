"""Checkpoints on disk: a lazy tensor reader, read-ahead and support files (writers: lata.shards).

A checkpoint is a Hugging Face model directory (or hub id) holding ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Tensors are zero-copy views of a private,
read-only-in-practice memory map of each file; nothing is loaded until asked for.

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
import shutil
import stat
import struct
import threading
import warnings
from pathlib import Path

import numpy
import torch
from safetensors import safe_open

from lata.atomic import write_json_atomic
from lata.atomic import libc_function

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
# Files fetched from the hub besides weights: config, generation config, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise CheckpointError(f"{what} {path} is {kind}; LATA reads regular files only")
    return path


class Checkpoint:
    """Lazy view of one checkpoint's tensors (names, shapes, dtypes, values)."""

    def __init__(self, path_or_id: str | os.PathLike, role: str = "model"):
        self.role = role
        self.source = str(path_or_id)
        self.path = resolve(path_or_id)
        self.config = self._read_config()
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._bases: dict[Path, int | None] = {}
        self._lock = threading.Lock()
        self.files = self._tensor_files()  # tensor name -> shard path
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            handle = self._open(file)
            for name in handle.keys():
                if self.files.get(name) == file:
                    sl = handle.get_slice(name)
                    self._headers[name] = (tuple(sl.get_shape()), sl.get_dtype())
        missing = sorted(set(self.files) - set(self._headers))
        if missing:
            raise CheckpointError(
                f"{self.path / INDEX_FILE} lists tensor '{missing[0]}' in "
                f"{self.files[missing[0]].name}, which does not contain it"
            )
        self._spans: dict[str, tuple[int, int]] = {}  # name -> (start, end) byte offsets in its file
        for file in sorted(set(self.files.values())):
            for name, span in _data_spans(file).items():
                if self.files.get(name) == file:
                    self._spans[name] = span

    def __repr__(self) -> str:
        return f"Checkpoint({self.role}: {self.path})"

    def _read_config(self) -> dict:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.role} checkpoint {self.path} has no config.json")
        try:
            return json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} names shard {shard.name}, which is missing")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        other = sorted(p.name for p in self.path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        hint = f" (found {', '.join(other)}; convert to safetensors)" if other else ""
        raise CheckpointError(f"{self.role} checkpoint {self.path} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"cannot read safetensors file {file}: {exc}") from exc
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
        return math.prod(self.shape(name)) * _DTYPE_BYTES.get(self.dtype_name(name), 4)

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


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """name -> (start, end) absolute byte offsets of each tensor's data in a safetensors file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

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


def copy_support_files(source: Path, target: Path, dtype: str | None = None) -> None:
    """Copy config, generation config and tokenizer files (everything but weights) from ``source``.

    ``dtype`` (e.g. 'bfloat16') is written into config.json's dtype key(s).
    """
    for item in sorted(Path(source).iterdir()):
        if not item.is_file() or item.name.endswith(WEIGHT_SUFFIXES) or item.name == INDEX_FILE:
            continue
        if item.name.lower().startswith("readme") or item.name.startswith("."):
            continue
        shutil.copy2(item, target / item.name)
    config_path = target / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        write_json_atomic(config_path, config)

