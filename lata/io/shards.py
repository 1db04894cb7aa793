"""Writing a merged checkpoint: its tensors into size-bounded safetensors shards, and the
support files (config, tokenizer...) it takes from its anchor (``copy_support_files``).

``StreamingShardWriter`` (what the engine uses) plans every shard from the tensors' headers and
writes each tensor as soon as it is merged, from a writer thread, with ``O_DIRECT`` where the
file system allows it; memory holds no shard. (The simple buffered writer it is tested against,
same shard layout, is ``tests/buffered_shards.py``.)
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import queue
import shutil
import struct
import threading
from pathlib import Path

import torch

from lata.io.atomic import write_json_atomic
from lata.io.digests import digest_of, new_hasher
from lata.io.files import CheckpointError
from lata.io.pagecache import address
from lata.io.tensorfiles import INDEX_FILE, SINGLE_FILE, TORCH_TO_SAFETENSORS, WEIGHT_SUFFIXES


WRITE_BEHIND_BYTES = 256 << 20  # merged bytes that may wait for the writer thread


class StreamingShardWriter:
    """Writes tensors straight into safetensors shards planned up front from their headers.

    Every (name, shape, dtype) is known before the first tensor arrives, so each shard's header
    is written first and each tensor's bytes are appended as soon as it is handed over: memory
    holds no shard buffer. Shards are filled in order, a shard closed when the next tensor
    would take it past ``max_shard_bytes`` (so a larger tensor has a shard of its own); they
    get their final Hugging Face names at once (the caller renames the directory into place,
    see ``lata.io.atomic``).

    - ``threaded``: a writer thread does the writes, so writing overlaps computing the next
      tensors; tensors wait for it while they hold at most ``behind_bytes`` (or one tensor,
      whatever its size): a large tensor's write overlaps the merge of the small ones after
      it. ``on_written(tensor)`` is called (from that thread) once a tensor's bytes are out,
      so its buffer can be reused.
    - ``direct``: data goes to the file with ``O_DIRECT``, straight from a tensor's memory where
      it and its file position are block-aligned, else through an aligned 16 MiB staging
      buffer; not through the page cache (a multi-GB output neither fills the page cache with
      dirty pages, evicting the inputs, nor pays for allocating them); the last partial block
      is written normally. Where the file system refuses ``O_DIRECT`` (tmpfs, some network
      file systems) the writes are ordinary buffered writes. The bytes are the same either way.
    """

    def __init__(self, directory: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, threaded: bool = True, direct: bool = False,
                 on_written=None, behind_bytes: int = WRITE_BEHIND_BYTES):
        self.directory = Path(directory)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = []
        size = 0
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        if not shards:
            raise CheckpointError("no tensors were written")
        count = len(shards)
        self.paths = [self.directory / (SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
                      for i in range(count)]
        self._shards = shards
        self._expected = [(i, entry) for i, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self.total_bytes = sum(e[3] for shard in shards for e in shard)
        self.direct = direct
        self._on_written = on_written
        self._file: _ShardFile | None = None
        #: file name -> content digest of each shard written whole (``lata.io.digests``)
        self.digests: dict[str, str] = {}
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._behind = 0  # bytes handed over and not yet written
        self._behind_max = behind_bytes
        self._written = threading.Condition()
        if threaded:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="lata-writer", daemon=True)
            self._thread.start()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected):
            raise CheckpointError(f"tensor '{name}' was not planned for this checkpoint")
        shard, (expected, shape, dtype, _) = self._expected[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"writer expected tensor '{expected}' {list(shape)} {dtype}, got '{name}' "
                                  f"{list(tensor.shape)} {tensor.dtype}")
        self._next += 1
        tensor = tensor.detach().to("cpu").contiguous()
        if self._queue is None:
            self._write(shard, expected, tensor)
            return
        nbytes = tensor.numel() * tensor.element_size()
        with self._written:
            while self._behind and self._behind + nbytes > self._behind_max and self._error is None:
                self._written.wait()
            self._raise_pending()
            self._behind += nbytes
        self._queue.put((shard, expected, tensor))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # reported to the caller by the next add/finish
                    self._error = exc
            tensor = item[2]
            with self._written:
                self._behind -= tensor.numel() * tensor.element_size()
                self._written.notify()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _write(self, shard: int, name: str, tensor: torch.Tensor) -> None:
        try:
            self._write_tensor(shard, name, tensor)
        except OSError as exc:  # a full disk, a lost mount: name the file
            raise OSError(exc.errno, f"{exc.strerror or exc} (writing tensor '{name}')", str(self.paths[shard])) from None

    def _write_tensor(self, shard: int, name: str, tensor: torch.Tensor) -> None:
        entries = self._shards[shard]
        if entries[0][0] == name:
            self._close_file()
            self._file = _ShardFile(self.paths[shard], self.direct)
            self._file.write(torch.frombuffer(bytearray(_safetensors_header(entries)), dtype=torch.uint8))
        if tensor.numel():
            self._file.write(tensor.reshape(-1).view(torch.uint8))
        if self._on_written is not None:
            self._on_written(tensor)
        if entries[-1][0] == name:
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
            self.digests[file.path.name] = digest_of(file.hasher)

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> list[Path]:
        self._stop()
        self._raise_pending()
        if self._next != len(self._expected):
            raise CheckpointError(f"tensor '{self._expected[self._next][1][0]}' was never written")
        self._close_file()
        if len(self.paths) > 1:
            weight_map = {e[0]: self.paths[i].name for i, shard in enumerate(self._shards) for e in shard}
            write_json_atomic(self.directory / INDEX_FILE,
                              {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return list(self.paths)

    def abort(self) -> None:
        """Stop the writer thread and close the open shard (after a failure)."""
        if self._thread is not None:
            self._error = self._error or CheckpointError("aborted")
            self._stop()
        if self._file is not None:
            file, self._file = self._file, None
            file.close(discard=True)


class _ShardFile:
    """One output file written front to back, through the page cache or with O_DIRECT."""

    BLOCK = 4096  # O_DIRECT alignment of buffers, offsets and lengths
    STAGE = 16 << 20

    def __init__(self, path: Path, direct: bool):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = None
        self.offset = 0  # bytes written so far
        self.hasher = new_hasher()  # of every byte written, in order
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.dfd = None
        if self.dfd is not None:
            self.stage = mmap.mmap(-1, self.STAGE)  # page-aligned, as O_DIRECT needs
            self.stage_address = address(self.stage)
            self.fill = 0

    def write(self, data: torch.Tensor) -> None:
        """Append a contiguous uint8 CPU tensor.

        With O_DIRECT: where the file position and the tensor's address are both multiples of
        4096, the whole blocks go to the file straight from the tensor's memory; other bytes are
        copied into the staging buffer by ``memmove`` through ctypes, which lets go of the GIL.
        The bytes are hashed on the way (``hasher``): the file is never read back.
        """
        self.hasher.update(memoryview(data.numpy()))
        if self.dfd is None:
            self._plain(memoryview(data.numpy()))
            return
        source, left = data.data_ptr(), data.numel()
        whole = left - left % self.BLOCK
        if whole and (self.offset + self.fill) % self.BLOCK == 0 and source % self.BLOCK == 0:
            if self.fill:
                self._flush_stage(self.fill)  # whole blocks: the file position stays aligned
            self._direct(memoryview(data.numpy())[:whole])
            source, left = source + whole, left - whole
        while left:
            n = min(left, self.STAGE - self.fill)
            ctypes.memmove(self.stage_address + self.fill, source, n)
            self.fill += n
            source += n
            left -= n
            if self.fill == self.STAGE:
                self._flush_stage(self.STAGE)

    def _direct(self, view: memoryview) -> None:
        """Write ``view`` (from page-aligned memory, at a block-aligned file position): its whole
        blocks with O_DIRECT, the rest through the page cache."""
        try:
            while len(view) >= self.BLOCK and self.dfd is not None:
                aligned = len(view) - len(view) % self.BLOCK
                written = os.pwrite(self.dfd, view[:aligned], self.offset)
                self.offset += written
                view = view[written:]
                if written % self.BLOCK:
                    break  # a short, unaligned write: the rest goes through the page cache
        except OSError:
            os.close(self.dfd)  # this file system refuses O_DIRECT: plain writes from here on
            self.dfd = None
        self._plain(view)

    def _plain(self, data: memoryview) -> None:
        while len(data):
            written = os.pwrite(self.fd, data, self.offset)
            self.offset += written
            data = data[written:]

    def _flush_stage(self, n: int) -> None:
        """Write the first n bytes of the staging buffer (n a multiple of BLOCK, or the tail)."""
        with memoryview(self.stage) as view:
            self._direct(view[:n])
        self.fill = 0

    def close(self, discard: bool = False) -> None:
        if self.dfd is not None and not discard and self.fill:
            self._flush_stage(self.fill)
        if self.dfd is not None:
            os.close(self.dfd)
            self.dfd = None
        if hasattr(self, "stage"):
            self.stage.close()
        os.close(self.fd)


def _safetensors_header(entries) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, nbytes in entries:
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Decision: the header is padded with spaces (as safetensors itself pads to 8 bytes) so that
    # the data starts at a multiple of 4096: a tensor whose bytes stay aligned in the file can
    # then be written with O_DIRECT straight from its memory, without a copy.
    raw += b" " * (-(8 + len(raw)) % _ShardFile.BLOCK)
    return struct.pack("<Q", len(raw)) + raw


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
