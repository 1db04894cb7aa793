"""Learned: layer weights learned from calibration data (layer-wise AdaMerging; the learning is
``lata.calibration.learned``), as an upper bound for the similarity-driven weightings.

The weights are learned by the run (``lata.run.caches.learned_weights``: once per family,
examples, lambdas and these keys, cached) and handed to the weighting (``with_weights``), which
then gives them like any other: they compose with every merge method, are written to
layer_analysis.json and drawn in its PNG. ``weights_for`` alone cannot give them: it does not
know which expert it is asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from lata.registry import ConfigError, in_range, one_of
from lata.weightings import Weighting, weighting

#: what ``weighting=learned`` minimises (``lata.calibration.learned``)
OBJECTIVES = ("entropy", "likelihood")


@weighting("learned")
@dataclass(frozen=True)
class Learned(Weighting):
    objective: str = "entropy"
    steps: int = 50
    lr: float = 0.01
    init: float = 1.0
    low: float = 0.0
    high: float = 2.0
    #: expert -> its learned block weights (``with_weights``), not a config key
    learned: Optional[Any] = field(default=None, repr=False, metadata={"given": True})
    needs_learning = True

    def check(self):
        one_of("weighting.objective", self.objective, OBJECTIVES)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"weighting.steps={self.steps!r} must be a whole number, at least 1")
        in_range("weighting.lr", self.lr, 0.0, float("inf"), low_open=True)
        if not self.low <= self.init <= self.high:
            raise ConfigError(f"weighting.init={self.init} must lie in [weighting.low, weighting.high] = "
                              f"[{self.low}, {self.high}]")

    def with_weights(self, learned: dict[str, list[float]]) -> "Learned":
        return dataclasses.replace(self, learned={k: list(v) for k, v in learned.items()})

    def weights_of(self, expert, similarities):
        if self.learned is None or expert not in self.learned:
            raise ConfigError(f"weighting=learned has no learned weights for expert '{expert}': they come from a run "
                              f"(lata.run.caches.learned_weights) or plan_merge(..., learned_weights=...)")
        weights = self.learned[expert]
        if len(weights) != len(similarities):
            raise ConfigError(f"weighting=learned: {len(weights)} learned weights for expert '{expert}', whose family "
                              f"has {len(similarities)} blocks")
        return list(weights)
