"""Memory maps and the page cache: where a mapped file is, which of its pages are cached, and
asking the kernel to map, drop or read pages.

Pages of a mapped file that are touched count in the process's resident set; ``advise`` with
``MADV_DONTNEED`` drops them from this process (the kernel's page cache keeps them, so a later
read costs a page fault, not a disk read), ``populate`` maps a range now (``MADV_POPULATE_READ``,
reading what is not cached), and ``resident`` asks ``mincore`` which pages are cached. madvise
and mincore are called through libc (``lata.io.atomic.libc_function``), which lets go of the
GIL during the call. ``read_exactly`` fills a buffer by ``pread``, outside any map.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy

from lata.io.atomic import libc_function

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux 5.14+


def _pages(mm: mmap.mmap, start: int, end: int) -> tuple[int, int]:
    """(offset, length) of the whole pages of ``mm`` covering bytes [start, end)."""
    first = start - start % PAGE
    return first, min(len(mm), -(-end // PAGE) * PAGE) - first


def advise(mm: mmap.mmap, base: int | None, start: int, end: int, advice: int) -> None:
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


def populate(mm: mmap.mmap, base: int | None, start: int, end: int) -> bool:
    """Map [start, end) of ``mm`` into the process now (reading it if it is not cached), so the
    consumer does not fault page by page. False where the kernel cannot (older than 5.14)."""
    try:
        advise(mm, base, start, end, MADV_POPULATE_READ)
    except (OSError, ValueError, AttributeError):
        return False
    return True


def address(mm: mmap.mmap) -> int | None:
    """The address a map starts at (valid for as long as the map is open)."""
    try:
        anchor = ctypes.c_char.from_buffer(mm)
    except (TypeError, ValueError):
        return None
    where = ctypes.addressof(anchor)
    del anchor  # no export is kept: the map can still be closed
    return where


def resident(base: int | None, start: int, end: int, samples: int | None = None) -> bool:
    """Whether every page of [start, end) of the map at ``base`` is in the page cache (one
    mincore call), or with ``samples``, that many evenly spaced pages. False when it cannot tell
    (no mincore; a file this user may not write, whose cached pages Linux does not report):
    reading ahead is then always asked for.
    """
    if _mincore is None or base is None or end <= start:
        return False
    first, last = start // PAGE, (end - 1) // PAGE
    spans = ([(first, last + 1)] if samples is None else
             [(p, p + 1) for p in sorted({first + (last - first) * i // max(1, samples - 1) for i in range(samples)})])
    for lo, hi in spans:
        vec = (ctypes.c_ubyte * (hi - lo))()
        if _mincore(ctypes.c_void_p(base + lo * PAGE), ctypes.c_size_t((hi - lo) * PAGE), vec) != 0:
            return False
        # bit 0 of each byte says "resident"; the other bits are reserved
        if not ((numpy.frombuffer(vec, dtype=numpy.uint8) & 1).all() if len(vec) > 64 else all(b & 1 for b in vec)):
            return False
    return True


_mincore = libc_function("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_madvise = libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def read_exactly(fd: int, out, offset: int) -> None:
    """Fill the buffer ``out`` from the file at ``offset`` (several reads where the kernel
    returns fewer bytes; the GIL is released while the kernel copies)."""
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view[:1 << 30]], offset)
        if n <= 0:
            raise EOFError(f"the file ends {len(view)} bytes early (truncated?)")
        view, offset = view[n:], offset + n
