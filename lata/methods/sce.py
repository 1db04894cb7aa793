"""SCE (FuseChat, Wan et al., 2024, arXiv 2408.07990), as mergekit 0.1.5 defines it: Select the
positions where the experts' vectors vary most, Calculate each expert's weight from its squared
magnitude, Erase the minority signs.

With u_k = lambda_k v_k (the lambda-scaled pure vectors of one tensor, K experts):
  select: with ``select_topk`` < 1, keep the top int(select_topk * (number of positions whose
          variance is not 0)) positions by the variance across experts, var = mean_k (u_k - mean_k u_k)^2
          (the same mask for every expert);
  weight: a_k = mean(kept u_k^2) / sum_j mean(kept u_j^2) over the tensor (1/K where that sum
          is below 1e-6, as mergekit);
  erase:  gamma = +1 where sum_k kept u_k >= 0, else -1; expert k agrees where sign(u_k) = gamma
          (a zero never agrees);
  delta = sum_k a_k u_k [agrees] / max(sum_k a_k [agrees], 1e-6).

Decisions:
- Parameter names and defaults are mergekit's (``select_topk`` = 1.0: no selection), so with
  uniform weights and lambda 1 this is mergekit's ``sce``. mergekit's sce takes no per-model
  weight; here lambda_k and the layer weight scale u_k before all three steps, as for TIES (a
  common lambda scales the delta by lambda; the weights a_k and the signs are unchanged).
- The statistics run over the experts the engine hands over (lambda_k w_{l,k} != 0): a block
  where a weighting gives an expert 0 is the SCE merge of the others.
- The variance is computed elementwise in float32 (two passes: the mean, then the squared
  deviations, in expert order: the same bits however the tensor is sliced); the selection keeps
  every position whose variance reaches the k-th largest (ties kept, where mergekit's topk keeps
  exactly k); the squared-magnitude means are summed in float64.
- mergekit's 1e-6 floor on sum_j mean(u_j^2) is absolute: task vectors whose values are about
  1e-3 or smaller fall under it, and the weights are then uniform. Kept as mergekit has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lata.methods import MergeMethod, merge_method
from lata.registry import in_range
from lata.selection import kth_largest

#: mergekit's floor under the sum of the squared-magnitude means (below it: uniform weights)
WEIGHT_FLOOR = 1e-6


def variance(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """The population variance across the u_k at each position, float32, elementwise."""
    mean = us[0].clone()
    for u in us[1:]:
        mean.add_(u)
    mean.div_(len(us))
    total = torch.sub(us[0], mean).square_()
    for u in us[1:]:
        total.add_(torch.sub(u, mean).square_())
    return total.div_(len(us))


def sce_weights(squares: Sequence[float], n: int) -> list[float]:
    """a_k from the sums of squares of the kept u_k over n positions."""
    means = [s / n for s in squares]
    total = sum(means)
    if abs(total) < WEIGHT_FLOOR:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def erased_mean(us: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k a_k u_k [sign(u_k) = gamma] / max(sum_k a_k [sign(u_k) = gamma], 1e-6)."""
    total = us[0].clone()
    for u in us[1:]:
        total.add_(u)
    gamma = torch.where(total >= 0, 1.0, -1.0)
    num = den = None
    for u, a in zip(us, weights):
        agree = (torch.sign(u) == gamma).to(u.dtype).mul_(a)
        num = torch.mul(u, agree) if num is None else num.add_(u * agree)
        den = agree if den is None else den.add_(agree)
    return num.div_(den.clamp_(min=1e-6))


@merge_method("sce")
@dataclass(frozen=True)
class Sce(MergeMethod):
    """SCE: top-variance positions (``select_topk``), squared-magnitude expert weights, minority
    signs erased (mergekit's ``sce``)."""

    select_topk: float = 1.0
    mergekit = "sce"

    def check(self):
        in_range("merge.select_topk", self.select_topk, 0.0, 1.0, low_open=True)

    mergekit_weights = "none"

    def mergekit_shared(self):
        return {"select_topk": self.select_topk}

    def _scaled(self, vectors, lams):
        return [v * lam if lam != 1.0 else v for v, lam in zip(vectors, lams)]

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """(the variance threshold or None, a_k per expert)."""
        n = vectors.shape.numel()
        cut = None
        if self.select_topk < 1:
            var = torch.cat(vectors.blocks(lambda vs: variance(self._scaled(vs, lams)).cpu()))
            kept = int(int(torch.count_nonzero(var)) * self.select_topk)
            cut = float("inf") if kept == 0 else kth_largest(var, kept, scratch=True)

        def squares(vs):
            us = self._scaled(vs, lams)
            mask = None if cut is None else variance(us) >= cut
            return torch.stack([(u if mask is None else u * mask).double().square().sum() for u in us]).cpu()

        sums = torch.stack(vectors.blocks(squares)).sum(dim=0)
        return cut, sce_weights([float(s) for s in sums], n)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        cut, weights = state
        us = self.contributions(vectors, lams, None, start, stop)
        if cut is not None:
            keep = (variance(us) >= cut).to(us[0].dtype)
            us = [u.mul_(keep) for u in us]
        return erased_mean(us, weights)
