"""Explicit: the user's own weight per layer, e.g. ``weighting.weights=[0,0,0.5,1]``, or one
model's per-layer weights in a mergekit recipe (``weighting.from_mergekit=PATH``,
``weighting.mergekit_model=...`` where several models have one; ``lata.results.mergekit``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from lata.results.mergekit import mergekit_layer_weights
from lata.registry import ConfigError
from lata.weightings import Weighting, weighting


@weighting("explicit")
@dataclass(frozen=True)
class Explicit(Weighting):
    weights: Optional[List[float]] = None
    from_mergekit: Optional[str] = None
    mergekit_model: Optional[str] = None

    def check(self):
        if self.from_mergekit is not None:
            if self.weights:
                raise ConfigError("weighting=explicit takes weighting.weights or weighting.from_mergekit, not both")
            if not Path(self.from_mergekit).expanduser().is_file():
                raise ConfigError(f"weighting.from_mergekit={self.from_mergekit}: no such file")
            return
        if self.mergekit_model is not None:
            raise ConfigError("weighting.mergekit_model picks a model of weighting.from_mergekit, which is not set")
        if not self.weights:
            raise ConfigError("weighting=explicit needs weighting.weights: a list of one number per layer "
                              "(or weighting.from_mergekit=PATH, a mergekit recipe)")

    def weights_for(self, similarities):
        L = len(similarities)
        if self.from_mergekit is not None:
            return mergekit_layer_weights(Path(self.from_mergekit).expanduser(), L, self.mergekit_model)
        if len(self.weights) != L:
            raise ValueError(f"weighting.weights must list one weight per layer: expected {L}, got {len(self.weights)}")
        return [float(x) for x in self.weights]
