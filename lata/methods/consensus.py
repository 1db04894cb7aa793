"""Consensus Task Arithmetic (TALL masks; Wang et al., ICML 2024, "Localizing Task Information
for Improved Model Merging and Compression"): keep the parameters that at least ``k`` experts'
TALL masks claim, and add the multi-task vector there.

With u_k = lambda_k v_k (the lambda-scaled pure vectors) and tau_MTL = sum_k u_k:
  mask_k = |u_k| >= tall_lambda * |tau_MTL - u_k|    (expert k's TALL mask)
  delta  = tau_MTL where sum_k mask_k >= k, else 0.

Decisions:
- The paper's theta_0 + lambda (m_consensus * tau_MTL) with one lambda is this with lambda_k =
  lambda for every k: the masks compare scaled values on both sides, so a common lambda leaves
  them unchanged, and the kept tau_MTL is scaled by it. Per-expert lambdas scale each tau_k
  before the masks and the sum.
- Parameter names: ``k`` (the paper's minimum number of agreeing masks; the paper's code calls
  it ``prun_thre_k``), default 2; ``tall_lambda`` (the paper's lambda_t, one for every expert),
  default 0.2, MergeBench's data-free value (the paper tunes lambda_t per task on validation
  data, which a data-free merge has not).
- ``>=`` as the paper writes the mask (MergeBench's code compares with ``>``: the masks differ
  only where the two sides are equal).
- The engine hands over the experts whose pure vector of the tensor is not zero; a zero vector's
  mask holds only where tau_MTL is 0, where the delta is 0 whatever the count, so the merge is
  the same as with every expert counted. Fewer than ``k`` experts: the delta is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lata.methods import MergeMethod, merge_method
from lata.registry import ConfigError, in_range


def agreement_counts(us: Sequence[torch.Tensor], tall_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_MTL, the number of TALL masks holding at each position): tau_MTL = sum_k u_k in expert
    order (a new tensor), mask_k = |u_k| >= tall_lambda * |tau_MTL - u_k|."""
    total = us[0].clone()
    for u in us[1:]:
        total.add_(u)
    count = torch.zeros(total.shape, dtype=torch.int32, device=total.device)
    for u in us:
        rest = torch.sub(total, u).abs_().mul_(tall_lambda)
        count.add_(torch.ge(u.abs(), rest).to(torch.int32))
    return total, count


def consensus_sum(us: Sequence[torch.Tensor], tall_lambda: float, k: int) -> torch.Tensor:
    """tau_MTL where at least ``k`` TALL masks hold, else 0."""
    total, count = agreement_counts(us, tall_lambda)
    return torch.where(count >= k, total, torch.zeros((), dtype=total.dtype, device=total.device))


@merge_method("consensus")
@dataclass(frozen=True)
class Consensus(MergeMethod):
    """Consensus TA: the sum of the lambda-scaled vectors where at least ``k`` experts' TALL
    masks (|u_k| >= tall_lambda |tau_MTL - u_k|) agree, 0 elsewhere."""

    k: int = 2
    tall_lambda: float = 0.2

    def check(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"merge.k={self.k!r} must be a whole number of experts, at least 1")
        in_range("merge.tall_lambda", self.tall_lambda, 0.0, float("inf"))

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return consensus_sum(self.contributions(vectors, lams, state, start, stop), self.tall_lambda, self.k)
