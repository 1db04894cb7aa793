"""Uniform: w_l = 1 for every layer (plain task arithmetic, TIES, DARE, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from lata.weightings import Weighting, weighting


@weighting("uniform")
@dataclass(frozen=True)
class Uniform(Weighting):
    def weights_for(self, similarities):
        return [1.0] * len(similarities)
