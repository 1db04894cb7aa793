"""TIES: magnitude trim, sign election, disjoint mean (LATA_SPEC `ties`).

Decisions the spec leaves open:
- The thresholds (the k-th largest |v| per tensor or over the whole model, k = ceil(density *
  n)) are exact selections (``lata.selection``).
- Once the thresholds are known, trim, election and mean are elementwise, written with
  arithmetic (threshold, copysign, relu, sign) rather than boolean masks: the same values,
  several times faster on the CPU, and the same in any slicing of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lata.methods import MergeMethod, merge_method
from lata.registry import ConfigError, in_range, one_of
from lata.selection import keep_count, largest_below


def trim(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the values with |v| >= threshold, zero the rest (a new tensor)."""
    if v.dtype != torch.float32 or np.float32(threshold) != threshold:
        return torch.where(v.abs() >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))
    kept = F.threshold_(v.abs(), largest_below(threshold), 0.0)  # |v| where |v| > below(t), else 0
    return kept.copysign_(v)


def disjoint_mean(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sign election and disjoint mean of already-scaled contributions u_k.

    gamma = sign(sum_k u_k); the mean over the k with sign(u_k) = gamma and u_k != 0; 0 where
    no contribution agrees. Written without masks: u_k agrees exactly when relu(u_k * gamma) > 0
    (gamma is -1, 0 or 1, so the product is exact), and the mean is gamma * sum_k relu(u_k *
    gamma) / max(count, 1), the same sum as that of the agreeing u_k with the sign taken out.
    """
    us = list(us)
    gamma = us[0] + us[1] if len(us) > 1 else us[0].clone()
    for u in us[2:]:
        gamma.add_(u)
    gamma.sign_()
    total = count = None
    for u in us:
        agreeing = torch.mul(u, gamma).relu_()
        if total is None:
            total, count = agreeing, torch.sign(agreeing)
        else:
            total.add_(agreeing)
            count.add_(torch.sign(agreeing))
    return total.mul_(gamma).div_(count.clamp_(min=1.0))


def ties(vectors: Sequence[torch.Tensor], lams: Sequence[float], thresholds: Sequence[float]) -> torch.Tensor:
    """TIES merge of one tensor given each expert's magnitude threshold (tensor or global scope)."""
    us = []
    for v, lam, t in zip(vectors, lams, thresholds):
        u = trim(v, t)
        if lam != 1.0:
            u.mul_(lam)
        us.append(u)
    return disjoint_mean(us)


@merge_method("ties")
@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: keep the ``density`` fraction of each v_k by magnitude (per tensor, or over the whole
    model with ``topk_scope=global``), elect signs, disjoint mean of lambda_k-scaled values."""

    density: float = 0.2
    topk_scope: str = "tensor"
    fused: ClassVar[bool] = True
    mergekit: ClassVar[str] = "ties"
    mergekit_normalize: ClassVar[bool] = True

    def check(self):
        in_range("merge.density", self.density, 0.0, 1.0, low_open=True)
        one_of("merge.topk_scope", self.topk_scope, ("tensor", "global"))

    def mergekit_parameters(self):
        if self.topk_scope != "tensor":
            raise ConfigError("merge.topk_scope=global has no mergekit counterpart (mergekit trims each tensor)")
        return {"density": self.density}

    @property
    def global_density(self):
        return self.density if self.topk_scope == "global" else None

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        if self.topk_scope == "tensor":
            return vectors.kth_largest_magnitudes(keep_count(vectors.shape.numel(), self.density))
        if thresholds is None:
            raise ValueError("TIES with topk_scope=global needs the whole-model thresholds")
        return list(thresholds)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return ties(vectors, lams, state)

    def fused_chunk(self, slices, lams, state, start, stop):
        return slices.ties(lams, [largest_below(t) for t in state], start, stop)
