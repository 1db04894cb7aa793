"""Drop-with-Threshold: w_l = 0 where the layer similarity s_l > threshold, else 1."""

from __future__ import annotations

from dataclasses import dataclass

from lata.registry import in_range
from lata.weightings import Weighting, weighting


@weighting("threshold")
@dataclass(frozen=True)
class Threshold(Weighting):
    threshold: float = 0.95

    def check(self):
        in_range("weighting.threshold", self.threshold, -1.0, 1.0)

    def weights_for(self, similarities):
        return [0.0 if s > self.threshold else 1.0 for s in similarities]
