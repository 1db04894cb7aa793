"""SLERP of two experts' full weights, as mergekit 0.1.5's ``slerp`` with the first expert as its
base model: theta = slerp(theta_1, theta_2, t) per tensor.

With x = theta_1, y = theta_2 (float32) of one tensor:
  cos = (x / |x|) . (y / |y|), clamped to [-1, 1] (a norm of at most 1e-8 counts as 1);
  |cos| > 0.9995: theta = (1 - t) x + t y (nearly parallel: linear interpolation);
  else, with a = arccos(cos): theta = sin((1 - t) a) / sin(a) x + sin(t a) / sin(a) y.
LATA merges theta = theta_out + delta: delta = slerp(theta_0 + d_1, theta_0 + d_2, t) - theta_0,
theta_0 + d_k being expert k's weights again (exactly, up to float32 rounding of the
difference), so the anchor drops out but for one rounding.

Decisions:
- Exactly two experts, in the order the family lists them; any other count is refused.
- The layer weights set t, they do not scale the vectors: in block l the two experts' shares
  are (1 - t) lambda_1 w_{l,1} and t lambda_2 w_{l,2}, and t_l is the second's share of their sum
  (``block_t``: t itself where the two are equal, 0 or 1 where one is 0). ``merge.lam`` alone
  (one lambda for both) leaves every t_l at t: a sweep over it repeats one merge. Where one
  expert's share is 0 the tensor is the other expert's own weights; where the two shares cancel
  (|sum| < 1e-6, a negative lambda) t_l = t.
- The cosine is computed from float64 sums of the float32 weights (mergekit: float32 norms of
  1M-value chunks), so a tensor whose cosine lies within float32 rounding of 0.9995 may take the
  other branch; the interpolation itself is float32, coefficient times weight, as mergekit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lata.methods import MergeMethod, merge_method
from lata.registry import in_range

#: mergekit's slerp: above this |cos| the two weights interpolate linearly
DOT_THRESHOLD = 0.9995


def block_t(t: float, a1: float, a2: float) -> float:
    """The second expert's share t a2 / ((1 - t) a1 + t a2) of the weights a_k = lambda_k w_{l,k}
    (t where |sum| < 1e-6)."""
    total = (1 - t) * a1 + t * a2
    return t if abs(total) < 1e-6 else t * a2 / total


def slerp_coefficients(gram: torch.Tensor, t: float) -> tuple[float, float]:
    """(c_1, c_2) with slerp(x, y, t) = c_1 x + c_2 y, from the [1, 2, 2] float64 Gram matrix of x, y."""
    nx, ny = (math.sqrt(max(float(gram[0, i, i]), 0.0)) for i in (0, 1))
    nx, ny = (n if n > 1e-8 else 1.0 for n in (nx, ny))
    cos = min(1.0, max(-1.0, float(gram[0, 0, 1]) / (nx * ny)))
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    angle = math.acos(cos)
    return math.sin((1 - t) * angle) / math.sin(angle), math.sin(t * angle) / math.sin(angle)


@merge_method("slerp")
@dataclass(frozen=True)
class Slerp(MergeMethod):
    """SLERP of the two experts' weights at t (per block, the weighting's share of the second)."""

    t: float = 0.5
    scales_vectors = False
    uses_anchor = True
    experts = 2
    mergekit = "slerp"

    def check(self):
        in_range("merge.t", self.t, 0.0, 1.0)

    mergekit_weights = "t"

    def mergekit_shared(self):
        return {}

    def mergekit_t(self, a1, a2):
        return block_t(self.t, a1, a2)

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """(c_1, c_2), or None where one expert is handed over (its weights whole)."""
        if len(experts) == 1:
            return None
        t = block_t(self.t, *(lam * w for lam, w in zip(lams, vectors.weights)))
        return slerp_coefficients(vectors.gram(anchored=True), t)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop, anchor=None):
        if state is None:
            return vectors[0]
        c1, c2 = state
        x = vectors[0].add_(anchor).mul_(c1)
        return x.add_(vectors[1].add_(anchor).mul_(c2)).sub_(anchor)
