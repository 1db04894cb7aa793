"""Shuffled: a control for the similarity signal. The weights another weighting (``of``:
linear_rank or log_rank, with ``drop``) gives an expert's blocks, permuted across the blocks by
a seeded random permutation, so the weights keep their values and lose their link to the
similarities. If shuffled weights merge as well as the unshuffled ones, the similarities carry
no information on that family.

Decision: the permutation is ``random.Random(seed).shuffle`` of the block indices, the same for
every expert of a merge (block l takes the weight of block order[l]): it
depends on the seed and L only, so it is reproducible and never on the similarities' last bits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lata.registry import one_of
from lata.weightings import Weighting, build_weighting, weighting


@weighting("shuffled")
@dataclass(frozen=True)
class Shuffled(Weighting):
    of: str = "linear_rank"
    drop: float = 0.5
    seed: int = 0

    def check(self):
        one_of("weighting.of", self.of, ("linear_rank", "log_rank"))
        build_weighting(self.of, drop=self.drop)  # checks drop

    def weights_for(self, similarities):
        """Block l gets the weight the unshuffled weighting gives block order[l]."""
        w = build_weighting(self.of, drop=self.drop).weights_for(similarities)
        order = list(range(len(w)))
        random.Random(self.seed).shuffle(order)
        return [w[i] for i in order]
