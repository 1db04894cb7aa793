"""The plan of a merge: family + method + per-layer weights + lambdas + how the work is done.

``plan_merge`` runs pass 1 (unless an analysis is given), turns the similarities into layer
weights and, where the method asks for one, selects each expert's whole-model magnitude
threshold. The plan is immutable data: what merging each tensor reads and with which scale
(``weight``, ``active_experts``, ``reads``), and the options of the engine's levers. A merge
keeps its run state (output dtype, scratch buffers, workers) in its own context
(``lata.engine``); a plan can be merged many times, into any sink (``lata.sinks``).

With anchor=instruct, theta_k - theta_0 is the task vector tau_k; with anchor=base it is the
complex vector tau_comp_k (docs/method.md). With a target (``Family.target``) the delta is added
to theta_target instead of theta_0.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from lata.accel import kernels
from lata.accel.compute import check_device, pure_slice, torch_threads, tune_malloc
from lata.accel.transfer import DeviceLoader
from lata.analysis import LayerAnalysis, layer_similarities
from lata.config import MergeConfig, WeightingConfig, validate_lams, validate_merge, validate_weighting
from lata.family import Family
from lata.io.checkpoints import Checkpoint
from lata.io.prefetch import Prefetcher
from lata.io.tensorfiles import TORCH_DTYPES
from lata.methods import MergeMethod
from lata.selection import global_threshold
from lata.registry import ConfigError
from lata.weightings import normalized

log = logging.getLogger("lata")

CPU_CHUNK = 1 << 18  # elements per slice on the CPU: 1 MiB of float32, cache-sized temporaries
DEVICE_CHUNK = 1 << 24  # elements per slice on an accelerator (fewer, larger transfers)


@dataclass(frozen=True)
class MergePlan:
    """Everything pass 2 needs: the family, the method, per-layer weights and lambdas, and the
    engine's options (none of which changes a merged value). ``with_options(staged=True, ...)``
    gives the same plan with other options."""

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
    #: expert -> its calibration statistics (``lata.calibration.statistics.Statistics``), where
    #: the method needs one (``MergeMethod.statistic``)
    statistics: dict[str, Any] | None = None
    #: a read-ahead thread asks the kernel for the next tensors' bytes
    prefetch: bool = True
    #: merge_to_dir writes from a writer thread, overlapping the next tensor's merge
    write_behind: bool = True
    #: elements per slice of a large tensor; None: CPU_CHUNK on the CPU, DEVICE_CHUNK elsewhere
    chunk_size: int | None = None
    #: merge_to_dir writes with O_DIRECT where the file system allows it
    direct_io: bool = True
    #: slice worker threads, each computing with one torch thread; None: lata.accel.compute.auto_threads()
    threads: int | None = None
    #: TA and TIES on the CPU run fused numba kernels where they can and the family is large
    #: enough (``lata.accel.kernels``)
    kernels: bool = True
    #: whole input tensors are read ahead onto the device (``lata.accel.transfer``) instead of
    #: being viewed in the memory maps; None: on an accelerator only
    staged: bool | None = None

    def with_options(self, **options: Any) -> "MergePlan":
        """The same plan with other engine options (prefetch, write_behind, chunk_size, direct_io,
        threads, kernels, staged)."""
        fixed = {"family", "method", "weights", "lams", "rest_weight", "anchor", "analysis", "device", "thresholds"}
        given = sorted(set(options) & fixed)
        if given:
            raise TypeError(f"with_options sets the engine's options, not {', '.join(given)}: plan again")
        return dataclasses.replace(self, **options)

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

    @property
    def vocab_source(self) -> Checkpoint:
        """The checkpoint whose vocabulary, tokenizer and config the output has
        (``Family.vocab``): its rows beyond the shared ones are the output's."""
        return self.family.vocab_checkpoint(self.anchor)

    def reads(self, name: str) -> list[tuple]:
        """(checkpoint, tensor) pairs that merging ``name`` reads."""
        anchor, base = self.family.anchor(self.anchor), self.output_base
        if not base.is_float(name):
            return [(base, name)]
        own = [(base, name)] if base is not anchor else []
        experts = [self.family.experts[k] for k in self.active_experts(name)]
        source = self.vocab_source
        rows = ([source] if name in self.family.vocab_tensors and all(source is not c for c in [anchor, base, *experts])
                else [])
        return [(anchor, name)] + own + [(c, name) for c in experts + rows]


def plan_merge(family: Family, merge: MergeConfig | None = None, weighting: WeightingConfig | None = None,
               *, device: str = "cpu", analysis: LayerAnalysis | None = None, progress: bool = True,
               threads: int | None = None, statistics: dict[str, Any] | None = None,
               learned_weights: dict[str, list[float]] | None = None) -> MergePlan:
    """Run pass 1 (unless ``analysis`` is given), derive the layer weights and build the plan.

    ``threads``: CPU slice workers for both passes (None: ``lata.accel.compute.auto_threads()``).
    ``statistics``: expert -> its calibration statistics, for a method that needs them
    (``MergeMethod.statistic``; ``lata.run.caches.calibration_statistics`` computes them).
    ``learned_weights``: expert -> its block weights, for ``weighting=learned``
    (``lata.run.caches.learned_weights`` learns them).
    """
    merge = MergeConfig.of(merge) if merge is not None else MergeConfig()
    weighting = WeightingConfig.of(weighting) if weighting is not None else WeightingConfig()
    method = validate_merge(merge)
    scheme = validate_weighting(weighting)
    check_device(device)
    validate_lams(merge.lams, family.expert_names)
    method.check_experts(family.expert_names)
    check_statistics(method, family.expert_names, statistics)
    if scheme.needs_learning:
        if learned_weights is None:
            raise ConfigError(f"weighting={weighting.name} needs weights learned from calibration data: a run learns "
                              f"them (lata.run.caches.learned_weights); the library takes plan_merge(..., "
                              f"learned_weights=...)")
        scheme = scheme.with_weights(learned_weights)
    if method.fused and kernels.worthwhile(family.nbytes, device):
        kernels.preload()
    if analysis is None:
        analysis = layer_similarities(family, device=device, progress=progress, threads=threads)
    for warning in analysis.degeneracies() + family.vocab_notes(merge.anchor):
        log.warning("%s", warning)
    weights = {k: normalized(scheme.weights_of(k, analysis.similarities[k]), weighting.normalize)
               for k in family.experts}
    rest_weight = scheme.rest_weight(weighting.rest_weight)
    for k, w in weights.items():
        if not any(w):
            log.warning("weighting=%s gives every one of the %d layers of expert '%s' weight 0: of its task vector "
                        "only the tensors outside the blocks (weight rest_weight=%g) are merged",
                        weighting.name, family.num_layers, k, rest_weight)
    plan = MergePlan(family=family, method=method, weights=weights,
                     lams={k: float(merge.lams.get(k, merge.lam)) for k in family.experts},
                     rest_weight=rest_weight, anchor=merge.anchor, analysis=analysis, device=device, threads=threads,
                     statistics=statistics if method.statistic is not None else None)
    if method.global_density is None:
        return plan
    return dataclasses.replace(plan, thresholds={k: _global_threshold(plan, k, method.global_density)
                                                 for k in family.experts})


def check_statistics(method: MergeMethod, experts: list[str], statistics: dict[str, Any] | None) -> None:
    """Refuse a data-aware method without every expert's statistic of the kind it needs."""
    if method.statistic is None:
        return
    missing = [k for k in experts if statistics is None or k not in statistics]
    if missing:
        raise ConfigError(f"merge={method.name} needs each expert's {method.statistic} statistics from calibration "
                          f"data, and expert '{missing[0]}' has none: on the embedded zoo calibration=auto draws its "
                          f"task sets; elsewhere give calibration=jsonl ++calibration.files.{missing[0]}=FILE.jsonl")
    wrong = [k for k in experts if getattr(statistics[k], "kind", method.statistic) != method.statistic]
    if wrong:
        raise ConfigError(f"merge={method.name} needs {method.statistic} statistics; expert '{wrong[0]}' was given "
                          f"{statistics[wrong[0]].kind}")


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
                rows = plan.family.shared_rows if name in plan.family.vocab_tensors else None
                if w == 0:
                    shape = anchor.shape(name)
                    yield math.prod(shape if rows is None else (rows, *shape[1:]))
                    continue
                theta0, theta_k = (loaded if staged else (anchor.get(name), ckpt.get(name)))
                theta0, theta_k = theta0[:rows].reshape(-1), theta_k[:rows].reshape(-1)
                n, step = theta0.numel(), plan.chunk()
                for start in range(0, n, step):
                    t0 = theta0[start:start + step].to(plan.device, torch.float32)
                    yield pure_slice(theta_k[start:start + step], t0, w, plan.device)
                if not staged:
                    anchor.release([name])
                    ckpt.release([name])

    return stream


def output_dtype(ckpt: Checkpoint, name: str, target: torch.dtype | None) -> torch.dtype:
    """The dtype tensor ``name`` is written in: ``target`` for a floating tensor where given,
    else the stored one."""
    stored = ckpt.torch_dtype(name)
    if stored is None:
        stored = ckpt.get(name).dtype
    return (target or stored) if stored.is_floating_point else stored


def output_entries(family: Family, anchor: str = "instruct", out_dtype: str | None = None
                   ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor of the merged checkpoint, from the headers."""
    ckpt, source = family.output_base(anchor), family.vocab_checkpoint(anchor)
    target = TORCH_DTYPES[out_dtype] if out_dtype else None
    return [(n, (source if n in family.vocab_tensors else ckpt).shape(n), output_dtype(ckpt, n, target))
            for n in family.tensor_names]


def output_bytes(family: Family, anchor: str = "instruct", out_dtype: str | None = None,
                 entries: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None) -> int:
    """Bytes of the merged checkpoint's tensors (what ``check_space`` asks the file system for),
    from ``entries`` where the caller has them already."""
    entries = output_entries(family, anchor, out_dtype) if entries is None else entries
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in entries)


__all__ = ["MergePlan", "plan_merge", "output_bytes", "output_entries", "output_dtype", "CPU_CHUNK", "DEVICE_CHUNK"]
