"""NuSLERP with a base model, as mergekit 0.1.5's ``nuslerp``: theta = theta_0 + nuslerp(t, d_1, d_2),
the spherical interpolation of the two experts' task vectors d_k = theta_k - theta_0, at
t = w_2 / (w_1 + w_2) from the experts' weights.

For each pair of vectors a = d_1, b = d_2 (the whole tensor with ``nuslerp_flatten``; else each
row over the last dimension, or with ``nuslerp_row_wise`` each column, the vectors along the
first dimension):
  cos = (a / max(|a|, 1e-7)) . (b / max(|b|, 1e-7)), clamped to [-1, 1];
  1 - cos^2 <= 1e-16: (1 - t) a + t b;
  else, with g = arccos(cos): (sin((1 - t) g) a + sin(t g) b) / sin(g).

Decisions:
- Exactly two experts, in the order the family lists them; any other count is refused.
- The layer weights and lambdas are the weights t comes from, as mergekit's per-model
  ``weight``: in block l, t_l = lambda_2 w_{l,2} / (lambda_1 w_{l,1} + lambda_2 w_{l,2}) (0.5 where
  |sum| < 1e-6, as mergekit), and they do not scale d_k. So ``export=mergekit`` writes this merge
  exactly, and ``merge.lam`` alone leaves t at 0.5: a sweep over it repeats one merge. Where one
  expert's weight is 0 the delta is the other's d_k whole (t = 0 or 1).
- The cosines come from float64 sums (mergekit: float32), the interpolation is float32 in
  mergekit's order (the two products summed, then divided by sin(g)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lata.methods import MergeMethod, merge_method


def nuslerp_coefficients(gram: torch.Tensor, t: float) -> torch.Tensor:
    """[rows, 3] float64 (s_1, s_2, divisor) per row of a [rows, 2, 2] Gram matrix:
    nuslerp(t, a, b) = (s_1 a + s_2 b) / divisor."""
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt().clamp(min=1e-7)
    cos = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    angle = torch.acos(torch.where(colinear, 0.0, cos))
    spherical = torch.stack([torch.sin((1 - t) * angle), torch.sin(t * angle), torch.sin(angle)], dim=1)
    linear = torch.tensor([1 - t, t, 1.0], dtype=torch.float64).expand_as(spherical)
    return torch.where(colinear[:, None], linear, spherical)


@merge_method("nuslerp")
@dataclass(frozen=True)
class Nuslerp(MergeMethod):
    """NuSLERP of the two experts' task vectors, t from their weights lambda_k w_{l,k}."""

    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False
    scales_vectors = False
    experts = 2
    mergekit = "nuslerp"

    def mergekit_shared(self):
        return {"nuslerp_flatten": self.nuslerp_flatten, "nuslerp_row_wise": self.nuslerp_row_wise}

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """(how positions map to rows, the row length, [rows, 3] float32 coefficients), or None
        where one expert is handed over."""
        if len(experts) == 1:
            return None
        a1, a2 = (lam * w for lam, w in zip(lams, vectors.weights))
        t = 0.5 if abs(a1 + a2) < 1e-6 else a2 / (a1 + a2)
        shape = vectors.shape
        if self.nuslerp_flatten or len(shape) < 2:
            mode, row = "whole", None
        elif self.nuslerp_row_wise:
            mode, row = "columns", shape.numel() // shape[0]
        else:
            mode, row = "rows", shape[-1]
        gram = vectors.gram(row, columns=mode == "columns")
        return mode, row, nuslerp_coefficients(gram, t).float()

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        if state is None:
            return vectors[0]
        mode, row, coef = state
        if mode == "whole":
            s1, s2, div = (float(c) for c in coef[0])
        else:
            index = torch.arange(start, stop)
            index = index // row if mode == "rows" else index % row
            s1, s2, div = (c.to(vectors[0].device) for c in coef[index].T)
        return vectors[0].mul_(s1).add_(vectors[1].mul_(s2)).div_(div)
