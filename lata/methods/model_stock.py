"""Model Stock (Jang et al., 2024, arXiv 2403.19522): per tensor, move from theta_0 towards the
experts' mean by a ratio set by how much their vectors agree.

t = N cos / (1 + (N - 1) cos), cos the mean over expert pairs of cos(v_i, v_j) (each pair's
cosine: the dot product over the product of the norms, the product at least 1e-6, clamped to
[-1, 1]); delta = t * (1/N) sum_k lambda_k v_k, which with lambda 1 and uniform weights is
mergekit's theta = t * mean(theta_k) + (1 - t) * theta_0. ``filter_wise``: one t per row of a
matrix (the last dimension's values), a 1-D tensor counting as one row, as mergekit's option.

Decisions:
- N counts the experts active in the tensor (lambda_k * w_{l,k} != 0: a layer a weighting drops
  for an expert leaves it out of that layer's statistics); with one active expert t = 1 (its
  vector added whole: no pair to measure).
- ``export=mergekit`` writes mergekit's ``model_stock`` (with ``filter_wise``), which takes no
  per-model weight: only where every lambda_k w_{l,k} is 1.
- The cosines come from the layer-weighted pure vectors v_k (a weight of the same sign for both
  experts leaves them as the task vectors' cosines) and are computed in float64 over fixed
  blocks (``lata.selection.block_gram``); the merge itself is float32 like every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lata.methods import MergeMethod, merge_method, summed


def stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t per row from the [rows, K, K] Gram matrices of K >= 2 vectors (float64)."""
    k = gram.shape[-1]
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = [(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(k) for j in range(i + 1, k)]
    cos = torch.stack(cosines).mean(dim=0)
    return k * cos / (1 + (k - 1) * cos)


@merge_method("model_stock")
@dataclass(frozen=True)
class ModelStock(MergeMethod):
    """Model Stock: delta = t * mean_k(lambda_k v_k), t from the mean pairwise cosine of the v_k
    (per tensor, or per row with ``filter_wise``)."""

    filter_wise: bool = False
    mergekit = "model_stock"
    mergekit_weights = "none"

    def mergekit_shared(self):
        return {"filter_wise": self.filter_wise}

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """(row length, t / N per row as float64)."""
        shape = vectors.shape
        row = shape[-1] if self.filter_wise and len(shape) >= 2 else None
        n = len(experts)
        if n < 2:
            return row, torch.ones(1, dtype=torch.float64)
        return row, stock_ratio(vectors.gram(row)).cpu() / n

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        row, scale = state
        total = summed(self.contributions(vectors, lams, None, start, stop))
        if row is None:
            return total.mul_(float(scale[0]))
        rows = torch.arange(start, stop) // row
        return total.mul_(scale[rows].to(total.device, torch.float32))
