"""Model Breadcrumbs (arXiv 2312.06795): per tensor, drop the largest ``gamma`` fraction of each
v_k by magnitude (outliers) and the smallest values, so that a ``density`` fraction remains; then
sum (``breadcrumbs``) or TIES sign election and disjoint mean (``breadcrumbs_ties``).

Where it follows and where it differs from mergekit's method of the same name: docs/method.md,
"Decisions the specification leaves open".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lata.methods import MergeMethod, merge_method, ties_variant
from lata.selection import keep_count
from lata.registry import in_range


def outlier_bounds(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(rank of the largest kept |v|, rank of the smallest kept), 1 = the largest of n."""
    kept = keep_count(n, density)
    top = min(math.floor(gamma * n * (1 + 1e-9)), n - kept)
    return top + 1, top + kept


def keep_between(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """v where lo <= |v| <= hi, else 0 (in place)."""
    magnitude = v.abs()
    return v.mul_(((magnitude >= lo) & (magnitude <= hi)).to(v.dtype))


@merge_method("breadcrumbs")
@dataclass(frozen=True)
class Breadcrumbs(MergeMethod):
    """Drop the top ``gamma`` and the bottom of each v_k so ``density`` remains; sum."""

    density: float = 0.9
    gamma: float = 0.01
    mergekit: ClassVar[str] = "breadcrumbs"

    def check(self):
        in_range("merge.density", self.density, 0.0, 1.0, low_open=True)
        in_range("merge.gamma", self.gamma, 0.0, 1.0, high_open=True)

    def mergekit_parameters(self):
        return {"density": self.density, "gamma": self.gamma}

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """Each expert's (lo, hi): the magnitudes of the smallest and the largest kept rank."""
        hi_rank, lo_rank = outlier_bounds(vectors.shape.numel(), self.density, self.gamma)
        return list(zip(vectors.kth_largest_magnitudes(lo_rank), vectors.kth_largest_magnitudes(hi_rank)))

    def kept(self, v, bounds, start, stop):
        return keep_between(v, *bounds)


BreadcrumbsTies = ties_variant(Breadcrumbs, "breadcrumbs_ties", mergekit="breadcrumbs_ties")
