"""Drop-by-Rank: rank layers by similarity (p = 0 the most instruction-like), drop the
D = round(drop * L) first, ramp the rest up to 1 linearly (``linear_rank``) or
logarithmically (``log_rank``).

Decision the spec leaves open: ``D = round(drop * L)`` rounds half up (``floor(x + 0.5)``), not
Python's half-to-even, so drop=0.5 with L=5 drops 3 layers, as a reader of the formula expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from lata.registry import in_range
from lata.weightings import Weighting, weighting


def rank_positions(similarities: Sequence[float]) -> list[int]:
    """p for each layer: 0 = most instruction-like (highest s); ties go to the lower index."""
    order = sorted(range(len(similarities)), key=lambda l: (-similarities[l], l))
    positions = [0] * len(similarities)
    for p, layer in enumerate(order):
        positions[layer] = p
    return positions


def dropped_count(drop: float, num_layers: int) -> int:
    """D = round(drop * L), half up."""
    return int(math.floor(drop * num_layers + 0.5))


@weighting("linear_rank")
@dataclass(frozen=True)
class LinearRank(Weighting):
    """w = 0 for p < D, else (p - D + 1) / (L - D)."""

    drop: float = 0.5

    def check(self):
        in_range("weighting.drop", self.drop, 0.0, 1.0, high_open=True)

    def ramp(self, p: int, D: int, L: int) -> float:
        return (p - D + 1) / (L - D)

    def weights_for(self, similarities):
        L = len(similarities)
        D = dropped_count(self.drop, L)
        return [0.0 if p < D else self.ramp(p, D, L) for p in rank_positions(similarities)]


@weighting("log_rank")
@dataclass(frozen=True)
class LogRank(LinearRank):
    """w = 0 for p < D, else log(1 + (p - D + 1)) / log(1 + (L - D))."""

    def ramp(self, p, D, L):
        return math.log(1 + (p - D + 1)) / math.log(1 + (L - D))
