"""Pass 2: stream each tensor of a plan through its merge method.

The one place that knows the order of work. For each tensor (grouped by the anchor's shard):
read theta_0 and every theta_k, form the pure vectors v_k = w * (theta_k - theta_0) in float32
on the plan's device, ask the method for the delta, and yield theta_0 + delta (theta_target +
delta, with a target) in the output dtype, for a sink (``lata.sinks``) to place. Memory holds
one tensor per expert at a time, never a whole model. The engine knows no method by name: the
method sees the whole tensor once in ``prepare`` (through ``_TensorVectors``, exact selections
of |v_k|) and is elementwise after that.

How a tensor is processed (the levers, each measured with benchmarks/scale.py: docs/performance.md):
- Inputs are zero-copy views of the checkpoints' memory maps; each tensor's pages are released
  from the process once it is merged, and a read-ahead thread (``prefetch``) asks the kernel
  for the next tensors' bytes while this one is computed.
- Tensors are processed in slices (``MergePlan.chunk``) with reused float32 temporaries, on
  slice workers each computing with one torch thread (``lata.accel.compute``); neither the
  slicing nor the number of workers changes a bit.
- On the CPU, for large families, TA and TIES run fused numba kernels (``lata.accel.kernels``:
  the same float32 operations in one loop per block, the same values).
- An expert whose scale lambda_k * w_{l,k} is 0 for a tensor contributes a zero vector to every
  method: it is not read, and a tensor no expert touches is theta_0 itself.
- Staged (``MergePlan.staged``, on an accelerator by default: ``lata.accel.transfer``): a loader
  thread reads each tensor's inputs whole and copies them to the device ahead of the merge; the
  result is copied back on another stream while the next tensor is merged (or stays there, for
  a model on the device). The same code runs on the CPU with ``staged=True``, with the same bits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from lata.accel import kernels
from lata.accel.compute import (SliceWorkers, as_float32, finite_sum, on_device, pure_slice, thread_buffer, torch_threads,
                                tune_malloc)
from lata.accel.transfer import DeviceLoader, HostCopies
from lata.io.files import CheckpointError
from lata.io.prefetch import Prefetcher
from lata.io.tensorfiles import TORCH_DTYPES
from lata.plan import MergePlan, output_dtype
from lata.selection import (band_around, block_gram, each_block, kth_largest, kth_largest_in_band, sample_positions,
                            scaled_magnitude)

#: Decision: the magnitudes |v_k| of every expert of one tensor are held together (one pass, the
#: anchor read once, each expert's selection on its own worker) while they fit in 1 GiB; a
#: larger tensor takes one expert at a time in one buffer (docs/performance.md, "Numbers
#: behind the defaults").
MAGNITUDE_BYTES = 1 << 30
#: Decision: with the fused kernels, tensors of at least this many values select their TIES
#: threshold by band (``selection.band_around``: a sample places the band, one pass counts
#: and gathers it); smaller ones, and every other path, select on all their magnitudes.
BAND_MIN_VALUES = 1 << 20


class OutputBuffers(Protocol):
    """Where a sink's reusable output buffers come from (``lata.sinks``)."""

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` to write a merged tensor into."""


class _Pass:
    """The run state of one merge of a plan: the output dtype of the tensor being merged, the
    slice workers, a reusable scratch buffer and the sink's output buffers."""

    def __init__(self, plan: MergePlan, buffers: OutputBuffers | None = None):
        self.plan, self.buffers = plan, buffers
        self.target: torch.dtype | None = None
        self.workers = SliceWorkers(1)
        self._scratch: torch.Tensor | None = None

    @classmethod
    @contextmanager
    def running(cls, plan: MergePlan, names: list[str], buffers: OutputBuffers | None = None):
        """A pass with its slice workers and a read-ahead thread over ``names``' inputs (none on
        the staged path, which reads through its own loader)."""
        tune_malloc()
        run = cls(plan, buffers)
        prefetcher = Prefetcher([] if plan.is_staged else [plan.reads(n) for n in names], enabled=plan.prefetch)
        run.workers = SliceWorkers(plan.threads, device=plan.device)
        try:
            yield run, prefetcher
        finally:
            prefetcher.close()
            run.workers.close()
            run._scratch = None

    def merged_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta_base + delta on the CPU, the stored theta_base) for one tensor, where theta_base
        is theta_0 or, with a target, theta_target.

        The merged tensor is in the dtype being written (inside ``iter_merged``) or float32.
        """
        try:
            with torch_threads(1, self.plan.device):
                return self.merged(name, lambda ckpt: ckpt.get(name))
        finally:
            for ckpt, n in self.plan.reads(name):
                ckpt.release([n])

    def merged(self, name: str, read) -> tuple[torch.Tensor, torch.Tensor]:
        """``merged_tensor`` from the inputs ``read(checkpoint)`` gives: views of the memory maps,
        or (staged) whole tensors already on the device, where the result is made too.

        A vocabulary tensor (``Family.vocab_tensors``) is merged on the rows every checkpoint
        shares; its other rows are the vocabulary source's own (``MergePlan.vocab_source``)."""
        family = self.plan.family
        rows = family.shared_rows if name in family.vocab_tensors else None
        full = read
        if rows is not None:
            read = lambda ckpt: full(ckpt)[:rows]  # noqa: E731
        anchor, output_base = family.anchor(self.plan.anchor), self.plan.output_base
        stored = read(anchor)
        base = stored if output_base is anchor else read(output_base)
        if not base.is_floating_point():
            return base.clone(), base
        dtype = self.target or torch.float32
        tail = None if rows is None else full(self.plan.vocab_source)[rows:]
        shape = base.shape if tail is None else (rows + tail.shape[0], *base.shape[1:])
        if base.device.type != "cpu":
            whole = torch.empty(shape, dtype=dtype, device=base.device)
        elif self.buffers is not None:
            whole = self.buffers.take(shape, dtype)
        else:
            whole = torch.empty(shape, dtype=dtype)
        out = whole if tail is None else whole[:rows]
        bad = self._merge_rows(name, stored, base, out, read)
        if tail is not None:  # the source's own rows beyond the shared ones
            whole[rows:].copy_(tail)
            bad += _non_finite(whole[rows:].reshape(-1)) if _may_overflow(tail.dtype, whole.dtype) else 0
        if bad:
            for ckpt, n in self.plan.reads(name):  # a NaN or Inf read from an input is named as such
                ckpt.refuse_non_finite(n)
            bad = _non_finite(whole.view(-1))
            hint = ("float16 ends at 65504: try out_dtype=bfloat16 or float32" if whole.dtype == torch.float16
                    else "lower the lambdas, or look at the experts' largest values")
            raise CheckpointError(f"merged tensor '{name}' has {bad} non-finite value(s) (NaN or Inf) in "
                                  f"{str(whole.dtype).removeprefix('torch.')}; nothing was written: the merged values "
                                  f"exceed the dtype's range ({hint})")
        return whole, base

    def _merge_rows(self, name: str, stored: torch.Tensor, base: torch.Tensor, out: torch.Tensor, read) -> int:
        """out = theta_base + delta (theta_base itself where no expert is active); the count of
        non-finite values written (0: all finite)."""
        active = self.plan.active_experts(name)
        if not active:  # every pure vector is 0: theta = theta_base
            out.copy_(base)
            # theta_base is finite (theta_0 checked by pass 1); a narrower dtype may overflow it
            return _non_finite(out.view(-1)) if _may_overflow(base.dtype, out.dtype) or base is not stored else 0
        return self._merge_into(name, stored, active, out, base, read)

    def _merge_into(self, name: str, stored: torch.Tensor, active: list[str], out: torch.Tensor,
                    base: torch.Tensor, read) -> int:
        """out[...] = theta_base + delta, slice by slice (theta_base: ``stored`` theta_0, or the
        target's tensor); returns 0 where every value written is finite (each slice is checked
        while it is in cache: by the fused kernels as they store, else by a float32 sum, finite
        only if every value is)."""
        device = self.plan.device
        views = [read(self.plan.family.experts[k]).reshape(-1) for k in active]
        weights = [self.plan.weight(k, name) for k in active]
        method = self.plan.method
        ws = weights if method.scales_vectors else [1.0] * len(weights)  # what multiplies each d_k
        lams = [self.plan.lams[k] for k in active]
        thresholds = None if self.plan.thresholds is None else [self.plan.thresholds[k] for k in active]
        theta0 = stored.reshape(-1)
        other = None if base is stored else base.reshape(-1)  # a target: added instead of theta_0
        fused = self._fused(theta0, views, ws, out) if other is None else None
        statistics = None if method.statistic is None else [self.plan.statistics[k].get(name) for k in active]
        vectors = _TensorVectors(self, name, active, stored.shape, theta0, views, ws, fused, weights, statistics)
        state = method.prepare(vectors, lams, active, name, thresholds)
        flat_out = out.view(-1)
        direct = out.dtype == torch.float32 and torch.device(device).type == "cpu"

        def work(start: int, stop: int) -> int:
            if fused is not None:
                return method.fused_chunk(fused, lams, state, start, stop)
            buffer = thread_buffer("merge", len(views) + 2, stop - start, device)
            t0 = as_float32(theta0[start:stop], buffer[0], device)
            vs = [pure_slice(v[start:stop], t0, w, device, buffer[2 + i]) for i, (v, w) in enumerate(zip(views, ws))]
            extra = {"anchor": t0} if method.uses_anchor else {}
            delta = method.delta_chunk(vs, lams, active, name, state, start, stop, **extra)
            if other is not None:
                t0 = as_float32(other[start:stop], buffer[1], device)
            if direct:
                torch.add(delta, t0, out=flat_out[start:stop])  # theta_0 + delta
            else:
                flat_out[start:stop].copy_(delta.add_(t0))  # theta_0 + delta, cast to the output dtype
            return _non_finite(flat_out[start:stop])

        return sum(self.workers.map(work, theta0.numel(), self.plan.chunk(fused is not None)))

    def _fused(self, theta0: torch.Tensor, views: list[torch.Tensor], ws: list[float],
               out: torch.Tensor) -> kernels.FusedSlices | None:
        """The fused kernels for this tensor, where the method has one and the dtypes allow."""
        if not (self.plan.kernels and self.plan.method.fused and kernels.worthwhile(self.plan.family.nbytes, self.plan.device)
                and theta0.is_contiguous() and out.is_contiguous()):
            return None
        if not kernels.supports([theta0.dtype] + [v.dtype for v in views], out.dtype, self.plan.device):
            return None
        return kernels.FusedSlices(theta0, views, ws, out)

    def scratch(self, rows: int, n: int) -> torch.Tensor:
        """A float32 (rows, n) buffer on the device, reused from tensor to tensor."""
        if self._scratch is None or self._scratch.numel() < rows * n or not on_device(self._scratch, self.plan.device):
            self._scratch = None
            self._scratch = torch.empty(rows * n, dtype=torch.float32, device=self.plan.device)
        return self._scratch[: rows * n].view(rows, n)


class _TensorVectors:
    """The pure vectors v_k = w_k * d_k (d_k = theta_k - theta_0) of one tensor for
    ``MergeMethod.prepare``, read slice by slice (``ws``: the w_k in them, all 1 for a method
    that does not ``scales_vectors``; ``weights``: the layer weights)."""

    def __init__(self, run: _Pass, name: str, experts: list[str], shape: torch.Size, theta0: torch.Tensor,
                 views, ws, fused: kernels.FusedSlices | None = None, weights: list[float] | None = None,
                 statistics: list | None = None):
        self.run, self.name, self.experts, self.shape = run, name, experts, shape
        self.theta0, self.views, self.ws, self.fused = theta0, views, ws, fused
        self.weights = list(ws) if weights is None else weights
        self.statistics = statistics

    def kth_largest_magnitudes(self, k: int) -> list[float]:
        """The k-th largest |v_k| of each expert, exactly.

        Decision: the selection runs on |d_k|, not on |w_k * d_k|, and is kept in the family's
        ``selections`` (per anchor, expert, tensor and k), so the points of a sweep over lambdas
        and weightings select once per tensor (about a third of a TIES merge); the weight is
        applied to the selected value (``selection.scaled_magnitude``: the same bits as selecting on
        the weighted vector).
        """
        memo = self.run.plan.family.selections
        keys = [("tensor", self.run.plan.anchor, expert, self.name, k) for expert in self.experts]
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
            found = dict(zip(counted, self.run.workers.each(lambda c: kth_largest_in_band(k, *c),
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
        out = self.run.scratch(1, n)[0].numpy()
        counts = self.run.workers.map(lambda start, stop: (start, *self.fused.band(i, lo, hi, out, start, stop)),
                                       n, self.run.plan.chunk(fused=True))
        return (sum(above for _, above, _ in counts),
                np.concatenate([out[start:start + inside] for start, _, inside in counts]))

    def _part(self, anchored: bool = False):
        """(start, stop) -> the float32 slices of the v_k (``anchored``: of theta_0 + v_k)."""
        device = self.run.plan.device

        def part(start: int, stop: int) -> list[torch.Tensor]:
            t0 = self.theta0[start:stop].to(device, torch.float32)
            vs = [pure_slice(view[start:stop], t0, w, device) for view, w in zip(self.views, self.ws)]
            return [v.add_(t0) for v in vs] if anchored else vs

        return part

    def gram(self, row: int | None = None, *, columns: bool = False, anchored: bool = False) -> torch.Tensor:
        """sum v_i * v_j of the pure vectors, whole, per row or per column
        (``lata.methods.TensorVectors``)."""
        return block_gram(self._part(anchored), self.theta0.numel(), row, columns=columns)

    def blocks(self, fn) -> list:
        """``[fn(slices) for each fixed block]`` (``lata.methods.TensorVectors``)."""
        return each_block(self._part(), self.theta0.numel(), fn)

    def each_magnitude(self, fn) -> list:
        """``[fn(i, |d_i|) for each expert i]`` (``lata.methods.TensorVectors``)."""
        return self._each_magnitude(fn, list(range(len(self.experts))))

    def _each_magnitude(self, fn, experts: list[int]) -> list:
        """``[fn(i, |d_i|) for i in experts]``, |d_i| flat float32 in a scratch buffer ``fn`` may
        reorder; the calls run on the workers, on different buffers."""
        n = self.theta0.numel()
        if len(experts) * n * 4 <= MAGNITUDE_BYTES:
            out = self._magnitudes(experts, self.run.scratch(len(experts), n))
            return self.run.workers.each(lambda pair: fn(*pair), list(zip(experts, out)))
        return [fn(i, self._magnitudes([i], self.run.scratch(1, n))[0]) for i in experts]

    def _magnitudes(self, experts: list[int], out: torch.Tensor) -> torch.Tensor:
        """|d_i| of the given experts into the rows of ``out``, in one pass over the slices."""
        device = self.run.plan.device

        def work(start: int, stop: int) -> None:
            if self.fused is not None:
                for row, i in enumerate(experts):
                    self.fused.magnitudes(i, out[row], start, stop)
                return
            buffer = thread_buffer("magnitudes", 2, stop - start, device)
            t0 = as_float32(self.theta0[start:stop], buffer[0], device)
            for row, i in enumerate(experts):
                torch.abs(pure_slice(self.views[i][start:stop], t0, 1.0, device, buffer[1]), out=out[row, start:stop])

        self.run.workers.map(work, self.theta0.numel(), self.run.plan.chunk(self.fused is not None))
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



def iter_merged(plan: MergePlan, out_dtype: str | None = None, progress: bool = True,
                keep_on_device: bool = False, buffers: OutputBuffers | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor on CPU) in the output dtype: ``out_dtype`` or the stored one
    (the anchor's, or the target's). ``keep_on_device``: where the plan is staged, the merged
    tensors stay on the compute device (no copy back: for a model that lives there).
    ``buffers``: where the sink's reusable output buffers come from (a fresh tensor each, else)."""
    target = TORCH_DTYPES[out_dtype] if out_dtype else None
    names = plan.family.tensor_names
    anchor = plan.output_base
    if plan.is_staged:
        yield from _iter_staged(plan, target, names, progress, keep_on_device, buffers)
        return
    with _Pass.running(plan, names, buffers) as (run, prefetcher):
        for i, name in enumerate(tqdm(names, desc=f"merge ({plan.method.name})", disable=not progress,
                                      leave=False)):
            prefetcher.advance(i)
            run.target = output_dtype(anchor, name, target)
            merged, stored = run.merged_tensor(name)
            if merged.is_floating_point():
                merged = merged.to("cpu", target or stored.dtype)
            yield name, merged


def _iter_staged(plan: MergePlan, target: torch.dtype | None, names: list[str], progress: bool,
                 keep_on_device: bool, buffers: OutputBuffers | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_merged`` on the staged path: a loader reads each tensor's inputs whole onto the
    device ahead of the merge, the merge runs there, and the result is copied back on a side
    stream while the next tensor is merged (``lata.accel.transfer``)."""
    anchor = plan.output_base
    reads = [plan.reads(n) if anchor.is_float(n) else [] for n in names]
    copies = HostCopies(plan.device)
    with _Pass.running(plan, [], buffers) as (run, _), DeviceLoader(reads, plan.device, threads=plan.threads) as loader:
        for i, name in enumerate(tqdm(names, desc=f"merge ({plan.method.name})", disable=not progress,
                                      leave=False)):
            run.target = output_dtype(anchor, name, target)
            loaded = {id(ckpt): t for (ckpt, _), t in zip(reads[i], loader.take(i))}
            if loaded:
                # one torch thread for the host's own small operations (histogram bookkeeping,
                # DARE and DELLA draws), on any device: idle OpenMP threads would spin beside
                # the readers
                with torch_threads(1):
                    merged, _ = run.merged(name, lambda ckpt: loaded[id(ckpt)])
            else:  # not floating: theta_0's own values
                merged = anchor.get(name).clone()
            if keep_on_device or merged.device.type == "cpu":
                yield from copies.keep(name, merged)
                continue
            host = buffers.take(merged.shape, merged.dtype) if buffers is not None else None
            yield from copies.put(name, merged, host)
        yield from copies.drain()


__all__ = ["iter_merged", "OutputBuffers"]
