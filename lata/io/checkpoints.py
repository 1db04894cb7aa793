"""Checkpoints on disk: hub resolution and a lazy view of a checkpoint's tensors.

A checkpoint is a Hugging Face model directory (or hub id) holding ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Tensors are zero-copy views of a private,
read-only-in-practice memory map of each file; nothing is loaded until asked for.

Every file is checked when the checkpoint is opened, before anything else reads it: a regular
file, config.json and the index JSON objects of the expected shape (``lata.io.files``), each
safetensors header as safetensors checks it (``lata.io.tensorfiles``). A malformed one is
refused with a one-line CheckpointError naming the file (and the tensor or key).

Memory: pages of a mapped file that are touched count in the process's resident set, so a
streaming reader that never lets go would end up "holding" every input it has read. ``release``
drops a tensor's pages from this process (the page cache keeps them) and ``prefetch`` maps a
tensor that is not in the page cache ahead (reading it from disk; elsewhere it asks the kernel
to read ahead, ``posix_fadvise(WILLNEED)``), so reading can overlap compute
(``lata.io.pagecache``). ``read_later`` reads a tensor into fresh memory by ``pread`` instead.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import threading
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from lata.io import pagecache
from lata.io.files import CheckpointError, json_kind, one_line, read_json, regular_file
from lata.io.tensorfiles import (DTYPE_BYTES, INDEX_FILE, SAFETENSORS_TO_TORCH, SINGLE_FILE, WEIGHT_SUFFIXES, TensorEntry,
                                 read_header, read_index)

# Files fetched from the hub besides weights: config, generation config, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: bytes per ``pread`` of ``Checkpoint.read_later``: pieces of a large tensor are read at once
READ_PIECE = 8 << 20


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
        return SAFETENSORS_TO_TORCH.get(self.dtype_name(name))

    def is_float(self, name: str) -> bool:
        """Whether a tensor holds floating values (a dtype torch cannot view counts as one)."""
        dtype = self.torch_dtype(name)
        return dtype is None or dtype.is_floating_point

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * DTYPE_BYTES[self.dtype_name(name)]

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
                self._bases[file] = pagecache.address(self._maps[file])
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
                    pagecache.read_exactly(fd, buffer[lo:hi], start + lo)
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
            if pagecache.resident(base, start, end) or pagecache.populate(mm, base, start, end):
                continue
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fds[file], start, end - start, os.POSIX_FADV_WILLNEED)

    def cached(self, names, samples: int | None = None) -> bool:
        """Whether every page of these tensors is in the page cache (False where it cannot tell);
        ``samples``: look at that many evenly spaced pages of each tensor instead (quicker)."""
        for file, start, end in self._regions(names):
            if end > start:
                self._map(file)
                if not pagecache.resident(self._bases.get(file), start, end, samples):
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
            pagecache.advise(mm, self._bases.get(file), start, end, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._handles.clear()
        self._maps.clear()  # a map still viewed by a live tensor is unmapped when the tensor goes
        self._bases.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
