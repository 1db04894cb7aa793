"""TIES: magnitude trim, sign election, disjoint mean (docs/method.md, `ties`).

Decisions the spec leaves open:
- The thresholds (the k-th largest |v| per tensor or over the whole model, k = ceil(density *
  n)) are exact selections (``lata.selection``).
- Once the thresholds are known, trim, election and mean are elementwise, written with
  arithmetic (threshold, copysign, relu, sign) rather than boolean masks: the same values, and
  the same in any slicing of the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lata.methods import MergeMethod, disjoint_mean, merge_method
from lata.registry import ConfigError, in_range, one_of
from lata.selection import keep_count, largest_below


def trim(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the values with |v| >= threshold, zero the rest (a new tensor)."""
    if v.dtype != torch.float32 or np.float32(threshold) != threshold:
        return torch.where(v.abs() >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))
    kept = F.threshold_(v.abs(), largest_below(threshold), 0.0)  # |v| where |v| > below(t), else 0
    return kept.copysign_(v)


@merge_method("ties")
@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: keep the ``density`` fraction of each v_k by magnitude (per tensor, or over the whole
    model with ``topk_scope=global``), elect signs, disjoint mean of lambda_k-scaled values."""

    density: float = 0.2
    topk_scope: str = "tensor"
    consensus: ClassVar = staticmethod(disjoint_mean)
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
        """Each expert's magnitude threshold: its k-th largest |v| in the tensor, or the
        whole-model one (``topk_scope=global``)."""
        if self.topk_scope == "tensor":
            return vectors.kth_largest_magnitudes(keep_count(vectors.shape.numel(), self.density))
        if thresholds is None:
            raise ValueError("TIES with topk_scope=global needs the whole-model thresholds")
        return list(thresholds)

    def kept(self, v, threshold, start, stop):
        return trim(v, threshold)

    def fused_chunk(self, slices, lams, state, start, stop):
        return slices.ties(lams, [largest_below(t) for t in state], start, stop)
