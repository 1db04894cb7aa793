"""LiNeS (arXiv 2410.17146): a depth-linear ramp, w_l = alpha + beta * l / (L - 1) for block
l = 0..L-1 (w_0 = alpha when L = 1), whatever the similarities; tensors outside the blocks get
``rest_weight`` = alpha unless it is set.

Decision: the defaults (alpha 0.5, beta 0.5: from half the vector at the first block to all of
it at the last) are a plain middle choice, not tuned on any family; the paper sets alpha and
beta per setting (e.g. from the number of tasks), so sweep them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lata.weightings import Weighting, weighting


@weighting("lines")
@dataclass(frozen=True)
class Lines(Weighting):
    alpha: float = 0.5
    beta: float = 0.5

    def weights_for(self, similarities):
        L = len(similarities)
        return [self.alpha + (self.beta * l / (L - 1) if L > 1 else 0.0) for l in range(L)]

    def rest_default(self):
        return self.alpha
