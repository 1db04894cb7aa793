"""Explicit: the user's own weight per layer, e.g. ``weighting.weights=[0,0,0.5,1]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from lata.registry import ConfigError
from lata.weightings import Weighting, weighting


@weighting("explicit")
@dataclass(frozen=True)
class Explicit(Weighting):
    weights: Optional[List[float]] = None

    def check(self):
        if not self.weights:
            raise ConfigError("weighting=explicit needs weighting.weights: a list of one number per layer")

    def weights_for(self, similarities):
        L = len(similarities)
        if len(self.weights) != L:
            raise ValueError(f"weighting.weights must list one weight per layer: expected {L}, got {len(self.weights)}")
        return [float(x) for x in self.weights]
