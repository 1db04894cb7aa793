"""Pass 2: stream tensors through a merge method into a directory, a state dict, or a model.

The one place that knows the order of work. For each tensor (grouped by the anchor's shard):
read theta_0 and every theta_k, form the pure vectors v_k = w * (theta_k - theta_0) in float32
on ``device``, ask the method for the delta, and hand theta_0 + delta, cast to the output
dtype, to the sink. Memory holds one tensor per expert at a time, never a whole model.

With anchor=instruct, theta_k - theta_0 is the task vector tau_k; with anchor=base it is the
complex vector tau_comp_k, exactly as LATA_SPEC defines them. With a target (``model.target``,
``Family.target``) the delta is added to theta_target instead of theta_0 (forgetting: subtract
a vector from the model that has the skill); the merged checkpoint then takes the target's
dtypes, config and tokenizer.

How a tensor is processed (the levers, each measured with benchmarks/scale.py: docs/performance.md):
- Inputs are zero-copy views of the checkpoints' memory maps. Each tensor's pages are released
  from the process once it is merged (they stay in the page cache), so resident memory is
  bounded by a few tensors instead of growing with every input read; a read-ahead thread
  (``prefetch``) asks the kernel for the next tensors' bytes while this one is computed.
- Tensors are processed in slices of ``chunk_size`` elements with float32 temporaries that fit
  in cache and are reused (no whole-tensor float32 copies). The method sees the whole tensor
  once in ``prepare`` (TIES and Breadcrumbs thresholds, DARE masks, DELLA's ranked draws) and
  is elementwise after that, so neither
  the slicing nor the number of slice workers (``threads``) changes a single bit.
- Compute runs with one torch thread per worker (``lata.accel.compute.torch_threads``). On the CPU,
  for families of 4 GB or more, TA and TIES run fused numba kernels instead (``lata.accel.kernels``:
  the same float32 operations in one loop per block, the same values).
- An expert whose scale lambda_k * w_{l,k} is 0 for a tensor (a layer LATA dropped) contributes
  a zero vector to every method; it is not read at all, and a tensor no expert touches is
  theta_0 itself.
- ``merge_to_dir`` plans the shards from the headers and writes each tensor as soon as it is
  merged, from a writer thread (``write_behind``), with O_DIRECT where possible (``direct_io``),
  reusing output buffers once written: no output shard is ever held in memory.
- On an accelerator the merge is staged (``MergePlan.staged``, ``lata.accel.transfer``): a loader
  thread reads each tensor's inputs whole (``pread`` into page-locked memory, in pieces on
  reader threads) and copies them to the device on a side stream ahead of the merge; the merge
  runs there in slices of ``DEVICE_CHUNK`` values; the result is copied back on another stream
  while the next tensor is merged (or stays there, for a model on the device:
  ``merge_into_model``). Selections run on the device too (``selection.kth_largest_by_bits``).
  The same code runs on the CPU with ``staged=True`` (the tests), with the same bits.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from lata.accel import kernels
from lata.analysis import LayerAnalysis, layer_similarities
from lata.io.atomic import atomic_directory
from lata.io.checkpoints import (TORCH_DTYPES, Checkpoint, CheckpointError, Prefetcher, copy_support_files, finite_sum,
                              torch_dtype_of)
from lata.accel.compute import (SliceWorkers, as_float32, check_device, on_device, page_aligned_empty, pure_slice,
                          thread_buffer, torch_threads, tune_malloc)
from lata.config import MergeConfig, WeightingConfig, parse_size, validate_lams, validate_merge, validate_weighting
from lata.family import Family
from lata.methods import MergeMethod
from lata.io.outputs import check_space, check_target, write_marker, writer_lock
from lata.selection import (band_around, global_threshold, kth_largest, kth_largest_in_band, sample_positions,
                            scaled_magnitude)
from lata.io.shards import StreamingShardWriter
from lata.accel.transfer import DeviceLoader, HostCopies
from lata.weightings import normalized

log = logging.getLogger("lata")

CPU_CHUNK = 1 << 18  # elements per slice on the CPU: 1 MiB of float32, cache-sized temporaries
DEVICE_CHUNK = 1 << 24  # elements per slice on an accelerator (fewer, larger transfers)
#: Decision: the magnitudes |v_k| of every expert of one tensor are held together (one pass, the
#: anchor read once, each expert's selection on its own worker) while they fit in 1 GiB; a
#: larger tensor takes one expert at a time in one buffer (faster on the 1.1B shape:
#: docs/performance.md, "Numbers behind the defaults").
MAGNITUDE_BYTES = 1 << 30
#: Decision: with the fused kernels, tensors of at least this many values select their TIES
#: threshold by band (``selection.band_around``: a sample places the band, one pass counts
#: and gathers it); smaller ones, and every other path, select on all their magnitudes.
BAND_MIN_VALUES = 1 << 20


@dataclass
class MergePlan:
    """Everything pass 2 needs: the family, the method, per-layer weights and lambdas."""

    family: Family
    method: MergeMethod
    weights: dict[str, list[float]]  # expert -> one weight per layer
    lams: dict[str, float]
    rest_weight: float
    anchor: str
    analysis: LayerAnalysis
    device: str = "cpu"
    #: expert -> whole-model |v| threshold, where the method asks for one (``global_density``)
    thresholds: dict[str, float] | None = None
    #: a read-ahead thread asks the kernel for the next tensors' bytes (never changes the result)
    prefetch: bool = True
    #: merge_to_dir writes from a writer thread, overlapping the next tensor's merge (same bytes)
    write_behind: bool = True
    #: elements per slice of a large tensor; None: CPU_CHUNK on the CPU, DEVICE_CHUNK elsewhere
    chunk_size: int | None = None
    #: merge_to_dir writes with O_DIRECT where the file system allows it (same bytes either way)
    direct_io: bool = True
    #: slice worker threads, each computing with one torch thread; None: lata.accel.compute.auto_threads()
    threads: int | None = None
    #: TA and TIES on the CPU run fused numba kernels where they can and the family is large
    #: enough (``lata.accel.kernels``; the same values)
    kernels: bool = True
    #: whole input tensors are read ahead onto the device (``lata.accel.transfer``: pinned memory and
    #: copies on a side stream on a GPU) instead of being viewed in the memory maps; None: on an
    #: accelerator only. The same values either way.
    staged: bool | None = None
    _target: torch.dtype | None = field(default=None, init=False, repr=False, compare=False)
    _scratch: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _workers: SliceWorkers | None = field(default=None, init=False, repr=False, compare=False)
    _pool: "_BufferPool | None" = field(default=None, init=False, repr=False, compare=False)

    @property
    def experts(self) -> list[str]:
        return self.family.expert_names

    @property
    def is_staged(self) -> bool:
        return torch.device(self.device).type != "cpu" if self.staged is None else bool(self.staged)

    def chunk(self, fused: bool = False) -> int:
        """Elements per slice: ``chunk_size`` if set, else by where and how the slice is computed."""
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        if torch.device(self.device).type != "cpu":
            return DEVICE_CHUNK
        return kernels.SLICE if fused else CPU_CHUNK

    def weight(self, expert: str, name: str) -> float:
        layer = self.family.layer_of(name)
        return self.rest_weight if layer is None else self.weights[expert][layer]

    def active_experts(self, name: str) -> list[str]:
        """The experts whose pure vector of tensor ``name`` is not zero: lambda_k * w_{l,k} != 0."""
        return [k for k in self.experts if self.weight(k, name) != 0 and self.lams[k] != 0]

    @property
    def output_base(self) -> Checkpoint:
        """The checkpoint the delta is added to: ``family.target``, else the anchor."""
        return self.family.output_base(self.anchor)

    def reads(self, name: str) -> list[tuple]:
        """(checkpoint, tensor) pairs that merging ``name`` reads."""
        anchor, base = self.family.anchor(self.anchor), self.output_base
        if not base.is_float(name):
            return [(base, name)]
        own = [(base, name)] if base is not anchor else []
        return [(anchor, name)] + own + [(self.family.experts[k], name) for k in self.active_experts(name)]

    def merged_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta_base + delta on the CPU, the stored theta_base) for one tensor, where theta_base
        is theta_0 or, with a target, theta_target.

        The merged tensor is in the dtype being written (inside ``iter_merged``) or float32.
        """
        try:
            with torch_threads(1, self.device):
                return self._merged(name, lambda ckpt: ckpt.get(name))
        finally:
            for ckpt, n in self.reads(name):
                ckpt.release([n])

    def _merged(self, name: str, read) -> tuple[torch.Tensor, torch.Tensor]:
        """``merged_tensor`` from the inputs ``read(checkpoint)`` gives: views of the memory maps,
        or (staged) whole tensors already on the device, where the result is made too."""
        anchor, output_base = self.family.anchor(self.anchor), self.output_base
        stored = read(anchor)
        base = stored if output_base is anchor else read(output_base)
        if not base.is_floating_point():
            return base.clone(), base
        dtype = self._target or torch.float32
        if base.device.type != "cpu":
            out = torch.empty(base.shape, dtype=dtype, device=base.device)
        elif self._pool is not None:
            out = self._pool.take(base.shape, dtype)
        else:
            out = torch.empty(base.shape, dtype=dtype)
        active = self.active_experts(name)
        if not active:  # every pure vector is 0: theta = theta_base
            out.copy_(base)
            # theta_base is finite (theta_0 checked by pass 1); a narrower dtype may overflow it
            bad = _non_finite(out.view(-1)) if _may_overflow(base.dtype, out.dtype) or base is not stored else 0
        else:
            bad = self._merge_into(name, stored, active, out, base, read)
        if bad:
            for ckpt, n in self.reads(name):  # a NaN or Inf read from an input is named as such
                ckpt.refuse_non_finite(n)
            bad = _non_finite(out.view(-1))
            hint = ("float16 ends at 65504: try out_dtype=bfloat16 or float32" if out.dtype == torch.float16
                    else "lower the lambdas, or look at the experts' largest values")
            raise CheckpointError(f"merged tensor '{name}' has {bad} non-finite value(s) (NaN or Inf) in "
                                  f"{str(out.dtype).removeprefix('torch.')}; nothing was written: the merged values "
                                  f"exceed the dtype's range ({hint})")
        return out, base

    def _merge_into(self, name: str, stored: torch.Tensor, active: list[str], out: torch.Tensor,
                    base: torch.Tensor, read) -> int:
        """out[...] = theta_base + delta, slice by slice (theta_base: ``stored`` theta_0, or the
        target's tensor); returns 0 where every value written is finite (each slice is checked
        while it is in cache: by the fused kernels as they store, else by a float32 sum, finite
        only if every value is)."""
        device = self.device
        views = [read(self.family.experts[k]).reshape(-1) for k in active]
        ws = [self.weight(k, name) for k in active]
        lams = [self.lams[k] for k in active]
        thresholds = None if self.thresholds is None else [self.thresholds[k] for k in active]
        theta0 = stored.reshape(-1)
        other = None if base is stored else base.reshape(-1)  # a target: added instead of theta_0
        fused = self._fused(theta0, views, ws, out) if other is None else None
        vectors = _TensorVectors(self, name, active, stored.shape, theta0, views, ws, fused)
        state = self.method.prepare(vectors, lams, active, name, thresholds)
        flat_out = out.view(-1)
        direct = out.dtype == torch.float32 and torch.device(device).type == "cpu"

        def work(start: int, stop: int) -> int:
            if fused is not None:
                return self.method.fused_chunk(fused, lams, state, start, stop)
            buffer = thread_buffer("merge", len(views) + 2, stop - start, device)
            t0 = as_float32(theta0[start:stop], buffer[0], device)
            vs = [pure_slice(v[start:stop], t0, w, device, buffer[2 + i]) for i, (v, w) in enumerate(zip(views, ws))]
            delta = self.method.delta_chunk(vs, lams, active, name, state, start, stop)
            if other is not None:
                t0 = as_float32(other[start:stop], buffer[1], device)
            if direct:
                torch.add(delta, t0, out=flat_out[start:stop])  # theta_0 + delta
            else:
                flat_out[start:stop].copy_(delta.add_(t0))  # theta_0 + delta, cast to the output dtype
            return _non_finite(flat_out[start:stop])

        return sum(self.workers.map(work, theta0.numel(), self.chunk(fused is not None)))

    def _fused(self, theta0: torch.Tensor, views: list[torch.Tensor], ws: list[float],
               out: torch.Tensor) -> kernels.FusedSlices | None:
        """The fused kernels for this tensor, where the method has one and the dtypes allow."""
        if not (self.kernels and self.method.fused and kernels.worthwhile(self.family.nbytes, self.device)
                and theta0.is_contiguous() and out.is_contiguous()):
            return None
        if not kernels.supports([theta0.dtype] + [v.dtype for v in views], out.dtype, self.device):
            return None
        return kernels.FusedSlices(theta0, views, ws, out)

    @property
    def workers(self) -> SliceWorkers:
        return self._workers if self._workers is not None else SliceWorkers(1)

    def scratch(self, rows: int, n: int) -> torch.Tensor:
        """A float32 (rows, n) buffer on the device, reused from tensor to tensor."""
        if self._scratch is None or self._scratch.numel() < rows * n or not on_device(self._scratch, self.device):
            self._scratch = None
            self._scratch = torch.empty(rows * n, dtype=torch.float32, device=self.device)
        return self._scratch[: rows * n].view(rows, n)


class _TensorVectors:
    """The pure vectors v_k = w_k * d_k (d_k = theta_k - theta_0) of one tensor for
    ``MergeMethod.prepare``, read slice by slice."""

    def __init__(self, plan: MergePlan, name: str, experts: list[str], shape: torch.Size, theta0: torch.Tensor,
                 views, ws, fused: kernels.FusedSlices | None = None):
        self.plan, self.name, self.experts, self.shape = plan, name, experts, shape
        self.theta0, self.views, self.ws, self.fused = theta0, views, ws, fused

    def kth_largest_magnitudes(self, k: int) -> list[float]:
        """The k-th largest |v_k| of each expert, exactly.

        Decision: the selection runs on |d_k|, not on |w_k * d_k|, and is kept in the family's
        ``selections`` (per anchor, expert, tensor and k), so the points of a sweep over lambdas
        and weightings select once per tensor (about a third of a TIES merge); the weight is
        applied to the selected value (``selection.scaled_magnitude``: the same bits as selecting on
        the weighted vector).
        """
        memo = self.plan.family.selections
        keys = [("tensor", self.plan.anchor, expert, self.name, k) for expert in self.experts]
        missing = [i for i, key in enumerate(keys) if key not in memo]
        if missing:
            memo.update((keys[i], t) for i, t in zip(missing, self._select(k, missing)))
        return [scaled_magnitude(memo[key], w) for key, w in zip(keys, self.ws)]

    def _select(self, k: int, experts: list[int]) -> list[float]:
        """The k-th largest |d_i| of the given experts: by band where the fused kernels run on a
        large tensor (each expert's band counted over the slices, then the bands selected on the
        workers; an expert whose band missed falls back), else on all the magnitudes."""
        n = self.theta0.numel()
        found: dict[int, float | None] = {}
        if self.fused is not None and n >= BAND_MIN_VALUES:
            positions = sample_positions(n)
            counted = {}
            for i in experts:
                band = band_around(self.fused.sample(i, positions), n, k)
                if band is not None:
                    counted[i] = self._band(i, *band)
            found = dict(zip(counted, self.plan.workers.each(lambda c: kth_largest_in_band(k, *c),
                                                             list(counted.values()))))
        rest = [i for i in experts if found.get(i) is None]
        if rest:
            found.update(zip(rest, self._each_magnitude(lambda _, magnitudes: kth_largest(magnitudes, k, scratch=True),
                                                        rest)))
        return [found[i] for i in experts]

    def _band(self, i: int, lo: float, hi: float) -> tuple[int, np.ndarray]:
        """How many |d_i| lie above hi, and a copy of those in [lo, hi] (gathered from the
        slices, in order), counted over the slices on the workers."""
        n = self.theta0.numel()
        out = self.plan.scratch(1, n)[0].numpy()
        counts = self.plan.workers.map(lambda start, stop: (start, *self.fused.band(i, lo, hi, out, start, stop)),
                                       n, self.plan.chunk(fused=True))
        return (sum(above for _, above, _ in counts),
                np.concatenate([out[start:start + inside] for start, _, inside in counts]))

    def each_magnitude(self, fn) -> list:
        """``[fn(i, |d_i|) for each expert i]`` (``lata.methods.TensorVectors``)."""
        return self._each_magnitude(fn, list(range(len(self.experts))))

    def _each_magnitude(self, fn, experts: list[int]) -> list:
        """``[fn(i, |d_i|) for i in experts]``, |d_i| flat float32 in a scratch buffer ``fn`` may
        reorder; the calls run on the workers, on different buffers."""
        n = self.theta0.numel()
        if len(experts) * n * 4 <= MAGNITUDE_BYTES:
            out = self._magnitudes(experts, self.plan.scratch(len(experts), n))
            return self.plan.workers.each(lambda pair: fn(*pair), list(zip(experts, out)))
        return [fn(i, self._magnitudes([i], self.plan.scratch(1, n))[0]) for i in experts]

    def _magnitudes(self, experts: list[int], out: torch.Tensor) -> torch.Tensor:
        """|d_i| of the given experts into the rows of ``out``, in one pass over the slices."""
        device = self.plan.device

        def work(start: int, stop: int) -> None:
            if self.fused is not None:
                for row, i in enumerate(experts):
                    self.fused.magnitudes(i, out[row], start, stop)
                return
            buffer = thread_buffer("magnitudes", 2, stop - start, device)
            t0 = as_float32(self.theta0[start:stop], buffer[0], device)
            for row, i in enumerate(experts):
                torch.abs(pure_slice(self.views[i][start:stop], t0, 1.0, device, buffer[1]), out=out[row, start:stop])

        self.plan.workers.map(work, self.theta0.numel(), self.plan.chunk(self.fused is not None))
        return out


def _non_finite(values: torch.Tensor) -> int:
    """How many of ``values`` (flat, floating) are NaN or Inf: on the CPU 0 at the cost of one
    float32 sum when the sum is finite (then every value is), else counted; on a device counted
    at once (one wait for the device instead of one per slice of the sum)."""
    if values.device.type != "cpu":
        return int(values.numel() - torch.isfinite(values).sum())
    if finite_sum(values):
        return 0
    return int(values.numel() - torch.isfinite(values).sum())


def _may_overflow(stored: torch.dtype, out: torch.dtype) -> bool:
    """Whether casting ``stored`` to ``out`` may overflow (a smaller largest finite value)."""
    return torch.finfo(out).max < torch.finfo(stored).max


def plan_merge(family: Family, merge: MergeConfig | None = None, weighting: WeightingConfig | None = None,
               *, device: str = "cpu", analysis: LayerAnalysis | None = None, progress: bool = True,
               threads: int | None = None) -> MergePlan:
    """Run pass 1 (unless ``analysis`` is given), derive the layer weights and build the plan.

    ``threads``: CPU slice workers for both passes (None: ``lata.accel.compute.auto_threads()``).
    """
    merge = MergeConfig.of(merge) if merge is not None else MergeConfig()
    weighting = WeightingConfig.of(weighting) if weighting is not None else WeightingConfig()
    method = validate_merge(merge)
    scheme = validate_weighting(weighting)
    check_device(device)
    validate_lams(merge.lams, family.expert_names)
    if method.fused and kernels.worthwhile(family.nbytes, device):
        kernels.preload()
    if analysis is None:
        analysis = layer_similarities(family, device=device, progress=progress, threads=threads)
    for warning in analysis.degeneracies():
        log.warning("%s", warning)
    weights = {k: normalized(scheme.weights_for(analysis.similarities[k]), weighting.normalize) for k in family.experts}
    rest_weight = scheme.rest_default() if weighting.rest_weight is None else float(weighting.rest_weight)
    for k, w in weights.items():
        if not any(w):
            log.warning("weighting=%s gives every one of the %d layers of expert '%s' weight 0: of its task vector "
                        "only the tensors outside the blocks (weight rest_weight=%g) are merged",
                        weighting.name, family.num_layers, k, rest_weight)
    plan = MergePlan(
        family=family,
        method=method,
        weights=weights,
        lams={k: float(merge.lams.get(k, merge.lam)) for k in family.experts},
        rest_weight=rest_weight,
        anchor=merge.anchor,
        analysis=analysis,
        device=device,
        threads=threads,
    )
    if method.global_density is not None:
        plan.thresholds = {k: _global_threshold(plan, k, method.global_density) for k in family.experts}
    return plan


def _global_threshold(plan: MergePlan, expert: str, density: float) -> float:
    """Expert k's whole-model magnitude threshold at ``density`` (``MergeMethod.global_density``),
    kept in the family's ``selections`` for the weights it was selected with (the points of a
    lambda sweep share it)."""
    key = ("global", plan.anchor, expert, density, tuple(plan.weights[expert]), plan.rest_weight)
    if key not in plan.family.selections:
        tune_malloc()
        with torch_threads(1, plan.device):
            plan.family.selections[key] = global_threshold(_expert_vectors(plan, expert), density)
    return plan.family.selections[key]


def _expert_vectors(plan: MergePlan, expert: str):
    """A re-iterable stream of expert k's pure vectors, slice by slice (for global top-k).

    A tensor whose weight w_{l,k} is 0 is a zero vector: it is counted (as an int), not read.
    """
    anchor, ckpt = plan.family.anchor(plan.anchor), plan.family.experts[expert]

    def stream():
        names = [n for n in plan.family.tensor_names if anchor.is_float(n)]
        reads = [[(anchor, n), (ckpt, n)] if plan.weight(expert, n) != 0 else [] for n in names]
        staged = plan.is_staged
        with (DeviceLoader(reads, plan.device, threads=plan.threads) if staged
              else Prefetcher(reads, enabled=plan.prefetch)) as ahead:
            for i, name in enumerate(names):
                if staged:
                    loaded = ahead.take(i)
                else:
                    ahead.advance(i)
                w = plan.weight(expert, name)
                if w == 0:
                    yield math.prod(anchor.shape(name))
                    continue
                theta0, theta_k = (loaded if staged else (anchor.get(name), ckpt.get(name)))
                theta0, theta_k = theta0.reshape(-1), theta_k.reshape(-1)
                n, step = theta0.numel(), plan.chunk()
                for start in range(0, n, step):
                    t0 = theta0[start:start + step].to(plan.device, torch.float32)
                    yield pure_slice(theta_k[start:start + step], t0, w, plan.device)
                if not staged:
                    anchor.release([name])
                    ckpt.release([name])

    return stream


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


@contextmanager
def _writing(plan: MergePlan, target: torch.dtype | None, names: list[str]):
    """Within the block, merged tensors come out in ``target`` (None: the anchor's dtype) and
    the read-ahead thread and the slice workers run."""
    tune_malloc()
    previous = plan._target
    # the staged path reads through its own loader (lata.accel.transfer), not the memory maps
    reads = [] if plan.is_staged else [plan.reads(n) for n in names]
    prefetcher = Prefetcher(reads, enabled=plan.prefetch)
    plan._workers = SliceWorkers(plan.threads, device=plan.device)
    try:
        yield prefetcher
    finally:
        prefetcher.close()
        plan._workers.close()
        plan._workers = None
        plan._target = previous
        plan._scratch = None


def _output_dtype(anchor: Checkpoint, name: str, target: torch.dtype | None) -> torch.dtype:
    stored = anchor.torch_dtype(name)
    if stored is None:
        stored = anchor.get(name).dtype
    return (target or stored) if stored.is_floating_point else stored


def output_entries(family: Family, anchor: str = "instruct", out_dtype: str | None = None
                   ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of the merged checkpoint, from the headers."""
    ckpt = family.output_base(anchor)
    target = TORCH_DTYPES[out_dtype] if out_dtype else None
    return [(n, ckpt.shape(n), _output_dtype(ckpt, n, target)) for n in family.tensor_names]


def output_bytes(family: Family, anchor: str = "instruct", out_dtype: str | None = None,
                 entries: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None) -> int:
    """Bytes of the merged checkpoint's tensors (what ``check_space`` asks the file system for),
    from ``entries`` where the caller has them already."""
    entries = output_entries(family, anchor, out_dtype) if entries is None else entries
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in entries)


def iter_merged(plan: MergePlan, out_dtype: str | None = None, progress: bool = True,
                keep_on_device: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor on CPU) in the output dtype: ``out_dtype`` or the stored one
    (the anchor's, or the target's). ``keep_on_device``: where the plan is staged, the merged
    tensors stay on the compute device (no copy back: for a model that lives there)."""
    target = TORCH_DTYPES[out_dtype] if out_dtype else None
    names = plan.family.tensor_names
    anchor = plan.output_base
    if plan.is_staged:
        yield from _iter_staged(plan, target, names, progress, keep_on_device)
        return
    with _writing(plan, target, names) as prefetcher:
        for i, name in enumerate(tqdm(names, desc=f"merge ({plan.method.name})", disable=not progress,
                                      leave=False)):
            prefetcher.advance(i)
            plan._target = _output_dtype(anchor, name, target)
            merged, stored = plan.merged_tensor(name)
            if merged.is_floating_point():
                merged = merged.to("cpu", target or stored.dtype)
            yield name, merged


def _iter_staged(plan: MergePlan, target: torch.dtype | None, names: list[str], progress: bool,
                 keep_on_device: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_merged`` on the staged path: a loader reads each tensor's inputs whole onto the
    device ahead of the merge, the merge runs there, and the result is copied back on a side
    stream while the next tensor is merged (``lata.accel.transfer``)."""
    anchor = plan.output_base
    reads = [plan.reads(n) if anchor.is_float(n) else [] for n in names]
    copies = HostCopies(plan.device)
    with _writing(plan, target, names), DeviceLoader(reads, plan.device, threads=plan.threads) as loader:
        for i, name in enumerate(tqdm(names, desc=f"merge ({plan.method.name})", disable=not progress,
                                      leave=False)):
            plan._target = _output_dtype(anchor, name, target)
            loaded = {id(ckpt): t for (ckpt, _), t in zip(reads[i], loader.take(i))}
            if loaded:
                # one torch thread for the host's own small operations (histogram bookkeeping,
                # DARE and DELLA draws), on any device: idle OpenMP threads would spin beside
                # the readers
                with torch_threads(1):
                    merged, _ = plan._merged(name, lambda ckpt: loaded[id(ckpt)])
            else:  # not floating: theta_0's own values
                merged = anchor.get(name).clone()
            if keep_on_device or merged.device.type == "cpu":
                yield from copies.keep(name, merged)
                continue
            host = plan._pool.take(merged.shape, merged.dtype) if plan._pool is not None else None
            yield from copies.put(name, merged, host)
        yield from copies.drain()


def merge_state_dict(plan: MergePlan, out_dtype: str | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """The merged model as a state dict (holds the whole output in memory: for small models)."""
    return dict(iter_merged(plan, out_dtype, progress))


def merge_to_dir(plan: MergePlan, out_dir: str | os.PathLike, *, out_dtype: str | None = None,
                 overwrite: bool | str = False, shard_size: str | int = "2GB", progress: bool = True,
                 record: dict | None = None, protected: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write the merged model as a sharded safetensors HF checkpoint, atomically.

    Config, generation config and tokenizer come from the anchor model (the target, where the
    family has one). Before any tensor is
    read, ``out_dir`` is checked (``lata.io.outputs``: never an input, ``overwrite`` false / true /
    "force", writable, room for the output) and locked against other writers. The checkpoint is
    built in a temporary sibling directory and renamed to ``out_dir`` only when whole; shards
    are planned from the headers and each tensor is written as soon as it is merged, and
    checked to be finite. The marker ``lata_merge.json`` (what was merged, ``record`` and every
    file's size) is written last.
    """
    max_bytes = parse_size(shard_size, key="shard_size")
    anchor = plan.output_base
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
        plan._pool = pool
        try:
            for name, tensor in iter_merged(plan, out_dtype, progress):
                writer.add(name, tensor)
            writer.finish()
            digests = writer.digests
        except BaseException:
            writer.abort()
            raise
        finally:
            plan._pool = None
        dtype_name = out_dtype or _anchor_dtype_name(plan)
        copy_support_files(anchor.path, tmp, dtype=dtype_name)
        write_marker(tmp, {"written_by": "lata", "method": plan.method.name, "anchor": plan.anchor,
                           "target": None if plan.family.target is None else plan.family.target.source,
                           "inputs": {c.role: c.source for c in plan.family.inputs}, "lams": plan.lams,
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


__all__ = ["MergePlan", "plan_merge", "iter_merged", "merge_state_dict", "merge_to_dir", "merge_into_model",
           "output_bytes"]
