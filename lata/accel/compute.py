"""Compute helpers shared by the two streaming passes (lata.analysis, lata.engine).

Slices of a tensor are processed with float32 temporaries reused per thread, one torch
intra-op thread per worker, and glibc told to keep freed temporaries; none of this changes a
bit of any result (tests/test_scale.py).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch

from lata.io.atomic import libc_function
from lata.registry import ConfigError

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def torch_threads(n: int, device: str = "cpu"):
    """Run the block with ``n`` torch intra-op threads (CPU only), restoring the caller's setting.

    Decision: the streaming passes compute with one torch thread per worker. Their operations
    are small (a slice of 2^18 elements); with several OpenMP threads each one ends at a barrier,
    and on a machine whose cores are busy with other work a barrier waits for a descheduled
    thread (many times slower than one thread: docs/performance.md).
    """
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MAX_AUTO_THREADS = 8


def free_memory(device: str = "cpu") -> int:
    """The bytes free on ``device``: a CUDA device's free memory, else the free RAM (a huge number
    where the system does not say)."""
    target = torch.device(device)
    if target.type == "cuda":
        return int(torch.cuda.mem_get_info(target)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


def check_device(device: str) -> None:
    """Refuse a device this torch cannot compute on, naming it, before anything is read."""
    kind = torch.device(device)
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={device!r}, but this torch ({torch.__version__}) sees no CUDA device; "
                              f"use device=cpu or install a CUDA build of torch")
        if kind.index is not None and kind.index >= count:
            raise ConfigError(f"device={device!r}, but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device!r}, but MPS is not available here; use device=cpu")


def auto_threads() -> int:
    """Slice workers when none are asked for: the cores this process may run on, at most 8.

    Decision: the default (docs/performance.md). The passes stream memory, so beyond a few
    cores bandwidth, not cores, bounds them (hence the cap).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_THREADS, cores))


class SliceWorkers:
    """Runs ``fn(start, stop)`` over the slices of [0, n) on ``threads`` worker threads.

    Each worker runs torch with one intra-op thread and takes whole slices, so several cores
    work on different slices instead of meeting at a barrier after every operation. With one
    thread (always on an accelerator) the slices run in the calling thread; ``None`` means
    ``auto_threads()``. Results come back in slice order, so they never depend on the thread
    count. On a machine whose cores are busy with other work, fewer threads can be faster
    (two workers sharing one free core only add switching): set ``threads=1`` there.
    """

    def __init__(self, threads: int | None = 1, device: str = "cpu"):
        self.threads = max(1, auto_threads() if threads is None else threads)
        if torch.device(device).type != "cpu":
            self.threads = 1
        self._pool = None
        if self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lata-slices",
                                            initializer=torch.set_num_threads, initargs=(1,))

    def map(self, fn: Callable[[int, int], object], n: int, step: int) -> list:
        ranges = [(start, min(n, start + step)) for start in range(0, n, step)]
        if self._pool is None:
            return [fn(a, b) for a, b in ranges]
        return list(self._pool.map(lambda r: fn(*r), ranges))

    def each(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """``[fn(item) for item in items]``, the items on different workers."""
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)  # an interrupt: the slices not started are dropped
            self._pool = None

    def __enter__(self) -> "SliceWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_local = threading.local()
_malloc_tuned = False


def tune_malloc() -> None:
    """Keep freed slice temporaries for reuse instead of returning them to the OS (glibc only).

    Streaming allocates and frees float32 temporaries of a few MiB per slice; glibc serves such
    blocks from fresh mappings or trims them back to the OS almost at once, so that without this
    every slice pays a page fault per 4 KiB of them (docs/performance.md).
    This sets the mmap threshold to 32 MiB and the trim threshold to 64 MiB, the values glibc's
    own dynamic thresholds reach once the process has freed one 32 MiB block. Once per process.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    mallopt = libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


PAGE = 4096


def page_aligned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype)`` on the CPU whose data starts at a multiple of 4096 bytes, so
    that an ``O_DIRECT`` write can take it without a copy (torch aligns to 64 bytes)."""
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(n + PAGE // itemsize, dtype=dtype)
    skip = (-raw.data_ptr() % PAGE) // itemsize
    return raw[skip:skip + n].view(shape)


def on_device(x: torch.Tensor, device: str | torch.device) -> bool:
    """Whether ``x`` lives on ``device`` ("cuda" names the current GPU: a tensor on cuda:0 is on
    it, though ``torch.device("cuda") != torch.device("cuda:0")``)."""
    want = torch.device(device)
    if x.device.type != want.type:
        return False
    if want.index is None and want.type == "cuda":
        return x.device.index == torch.cuda.current_device()
    return want.index is None or x.device.index == want.index


def thread_buffer(tag: str, rows: int, cols: int, device: str) -> torch.Tensor:
    """A float32 (rows, cols) scratch buffer owned by the calling thread, reused across calls
    with the same ``tag`` (fresh multi-MiB allocations cost a page fault per 4 KiB)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(tag)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] < cols or not on_device(buffer, device):
        buffers[tag] = buffer = torch.empty((rows, cols), dtype=torch.float32, device=device)
    return buffer[:rows, :cols]


def as_float32(x: torch.Tensor, buffer: torch.Tensor, device: str) -> torch.Tensor:
    """``x`` in float32 on ``device``: itself when it already is, else converted into ``buffer``."""
    if x.dtype == torch.float32 and on_device(x, device):
        return x
    return buffer.copy_(x)


def pure_slice(theta_k: torch.Tensor, theta0: torch.Tensor, w: float, device: str,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """v = w * (theta_k - theta_0) for one slice, float32 on ``device`` (into ``out`` if given)."""
    if out is None:
        out = theta_k.to(device, torch.float32).sub(theta0)
    elif theta_k.dtype == torch.float32 and on_device(theta_k, device):
        torch.sub(theta_k, theta0, out=out)
    else:
        out.copy_(theta_k).sub_(theta0)
    return out.mul_(w) if w != 1.0 else out  # x * 1.0 is x: skipping it changes nothing


def finite_sum(x: torch.Tensor, step: int = 1 << 18) -> bool:
    """True if the float32 sum of ``x`` is finite (then every value is); summed by slices of
    ``step`` values, each widened to float32 as it is summed (no float32 copy of the whole
    tensor)."""
    flat = x.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), step):
        total += float(flat[start:start + step].sum(dtype=torch.float32))
    return math.isfinite(total)
