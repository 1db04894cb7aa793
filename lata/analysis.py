"""Pass 1: per-layer similarity of each expert's complex vector to the instruction vector.

s_{l,k} = cos(tau_comp_k[l], tau_instr[l]) with tau_comp_k = theta_k - theta_base and
tau_instr = theta_inst - theta_base, from sums over the block's tensors of per-tensor dot
products and squared norms (never a concatenated layer vector). The products are computed in
float32 over fixed slices of 2^18 elements of each tensor; the sums over slices and tensors are
accumulated in float64. This pass also reads every input tensor once and refuses NaN/Inf
before anything is written: a tensor is checked element by element only when a cheap test
fails (a sum, or a squared norm already computed, is finite only if every term is).

Reading is streamed as in the merge (``lata.engine``): zero-copy views of the memory maps, a
read-ahead thread, and each tensor's pages released from the process once used.
"""

from __future__ import annotations

import csv
import ctypes
import io
import math
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from lata.checkpoints import Prefetcher
from lata.family import Family

BLOCK = 1 << 18  # elements per float32 partial dot product (fixed: results never depend on settings)
PREFETCH_BYTES = 512 << 20


@contextmanager
def torch_threads(n: int, device: str = "cpu"):
    """Run the block with ``n`` torch intra-op threads (CPU only), restoring the caller's setting.

    Decision: the streaming passes compute with one torch thread per worker. Their operations
    are small (a slice of 2^18 elements); with several OpenMP threads each one ends at a barrier,
    and on a machine whose cores are busy with other work a barrier waits for a descheduled
    thread: measured on the shared 2-core machine, 7 to 30 times slower than one thread.
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


class SliceWorkers:
    """Runs ``fn(start, stop)`` over the slices of [0, n) on ``threads`` worker threads.

    Each worker runs torch with one intra-op thread and takes whole slices, so several cores
    work on different slices instead of meeting at a barrier after every operation. With
    ``threads=1`` (the default, and always on an accelerator) the slices run in the calling
    thread. Results come back in slice order, so they never depend on the thread count.
    On an idle machine with many cores more threads help; on the shared 2-core machine one
    was fastest (two workers on one free core only add switching).
    """

    def __init__(self, threads: int | None = 1, device: str = "cpu"):
        self.threads = max(1, threads or 1)
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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
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
    blocks from fresh mappings or trims them back to the OS almost at once, so every slice paid
    a page fault per 4 KiB (measured: ~4 times the page faults and 10-35% of the merge time).
    This sets the mmap threshold to 32 MiB and the trim threshold to 64 MiB, the values glibc's
    own dynamic thresholds reach once the process has freed one 32 MiB block. Once per process.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 64 << 20)


def thread_buffer(tag: str, rows: int, cols: int, device: str) -> torch.Tensor:
    """A float32 (rows, cols) scratch buffer owned by the calling thread, reused across calls
    with the same ``tag`` (fresh multi-MiB allocations cost a page fault per 4 KiB)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(tag)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] < cols or buffer.device != torch.device(device):
        buffers[tag] = buffer = torch.empty((rows, cols), dtype=torch.float32, device=device)
    return buffer[:rows, :cols]


def as_float32(x: torch.Tensor, buffer: torch.Tensor, device: str) -> torch.Tensor:
    """``x`` in float32 on ``device``: itself when it already is, else converted into ``buffer``."""
    if x.dtype == torch.float32 and x.device == torch.device(device):
        return x
    return buffer.copy_(x)


@dataclass
class LayerAnalysis:
    experts: list[str]
    num_layers: int
    dot: dict[str, list[float]] = field(default_factory=dict)  # <tau_comp_k[l], tau_instr[l]>
    comp_sq: dict[str, list[float]] = field(default_factory=dict)  # ||tau_comp_k[l]||^2
    instr_sq: list[float] = field(default_factory=list)  # ||tau_instr[l]||^2

    @property
    def similarities(self) -> dict[str, list[float]]:
        """s_{l,k}; 0 where either norm is 0."""
        return {
            k: [
                self.dot[k][l] / math.sqrt(self.comp_sq[k][l] * self.instr_sq[l])
                if self.comp_sq[k][l] > 0 and self.instr_sq[l] > 0 else 0.0
                for l in range(self.num_layers)
            ]
            for k in self.experts
        }

    def table(self, weights: dict[str, list[float]] | None = None) -> list[dict]:
        """One row per (expert, layer): similarity, norms and (if given) the layer weight."""
        sims = self.similarities
        rows = []
        for k in self.experts:
            for l in range(self.num_layers):
                row = {"expert": k, "layer": l, "similarity": sims[k][l],
                       "comp_norm": math.sqrt(self.comp_sq[k][l]), "instr_norm": math.sqrt(self.instr_sq[l])}
                if weights is not None:
                    row["weight"] = weights[k][l]
                rows.append(row)
        return rows

    def to_csv(self, weights: dict[str, list[float]] | None = None) -> str:
        rows = self.table(weights)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def to_dict(self, weights: dict[str, list[float]] | None = None) -> dict:
        data = {"experts": self.experts, "num_layers": self.num_layers, "similarities": self.similarities}
        if weights is not None:
            data["weights"] = weights
        return data


def layer_similarities(family: Family, device: str = "cpu", progress: bool = True,
                      prefetch: bool = True, threads: int = 1) -> LayerAnalysis:
    """Stream every tensor of the family once and accumulate the per-layer sums.

    ``prefetch``: a read-ahead thread; ``threads``: slice workers (see ``SliceWorkers``). Neither
    changes the result.
    """
    L, experts = family.num_layers, family.expert_names
    result = LayerAnalysis(
        experts=experts, num_layers=L,
        dot={k: [0.0] * L for k in experts}, comp_sq={k: [0.0] * L for k in experts}, instr_sq=[0.0] * L,
    )
    tune_malloc()
    ckpts = family.checkpoints  # base, instruct, experts (in order)
    names = family.tensor_names
    with Prefetcher([[(c, n) for c in ckpts] for n in names], PREFETCH_BYTES, enabled=prefetch) as prefetcher, \
            SliceWorkers(threads, device=device) as workers, torch_threads(1, device):
        for i, name in enumerate(tqdm(names, desc="layer similarities", disable=not progress, leave=False)):
            prefetcher.advance(i)
            views = [c.get(name) for c in ckpts]
            layer = family.layer_of(name)
            try:
                if layer is None or not views[0].is_floating_point():
                    for ckpt, view in zip(ckpts, views):
                        ckpt.check_finite(name, view)
                    continue
                gram = _gram(views, device, workers)  # rows: tau_instr, tau_comp_1..K
                if not all(math.isfinite(gram[j][j]) for j in range(len(gram))):
                    for ckpt, view in zip(ckpts, views):
                        ckpt.refuse_non_finite(name, view)  # names the first culprit
                result.instr_sq[layer] += gram[0][0]
                for j, k in enumerate(experts, start=1):
                    result.dot[k][layer] += gram[j][0]
                    result.comp_sq[k][layer] += gram[j][j]
            finally:
                for ckpt in ckpts:
                    ckpt.release([name])
    return result


def _gram(views: list[torch.Tensor], device: str, workers: SliceWorkers | None = None) -> list[list[float]]:
    """Dot products of tau_instr and each tau_comp_k (rows minus the base), summed over slices.

    Returns G with G[0][0] = ||tau_instr||^2, G[j][0] = <tau_comp_j, tau_instr> and
    G[j][j] = ||tau_comp_j||^2 (j >= 1); other entries are 0. Each slice of BLOCK elements gives
    float32 dot products; they are added up in float64, in slice order.
    """
    flat = [v.reshape(-1) for v in views]
    base, rest = flat[0], flat[1:]
    n, rows = base.numel(), len(rest)

    def block(start: int, stop: int) -> torch.Tensor:
        buffer = thread_buffer("gram", rows + 1, BLOCK, device)[:, : stop - start]
        x = buffer[:rows]
        b = as_float32(base[start:stop], buffer[rows], device)
        for j, v in enumerate(rest):
            v = v[start:stop]
            if v.dtype == torch.float32 and v.device == torch.device(device):
                torch.sub(v, b, out=x[j])
            else:
                x[j].copy_(v).sub_(b)
        parts = [torch.dot(x[0], x[0])]
        for j in range(1, rows):
            parts += [torch.dot(x[j], x[0]), torch.dot(x[j], x[j])]
        return torch.stack(parts).double()

    partials = (workers or SliceWorkers(1)).map(block, n, BLOCK)
    sums = partials[0]
    for part in partials[1:]:
        sums = sums + part
    values = sums.tolist()
    gram = [[0.0] * rows for _ in range(rows)]
    gram[0][0] = values[0]
    for j in range(1, rows):
        gram[j][0], gram[j][j] = values[2 * j - 1], values[2 * j]
    return gram
