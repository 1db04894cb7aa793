"""DELLA (arXiv 2406.11617, MagPrune): per tensor, keep each value of v_k with a probability that
rises linearly with its magnitude rank, from ``density - epsilon`` (the smallest) to
``density + epsilon`` (the largest), rescale the kept values by 1/p; then TIES sign election and
disjoint mean (``della``) or a plain sum (``della_linear``) of the lambda-scaled results.

p_i = (density - epsilon) + 2 epsilon r_i / (n - 1), with r_i in 0..n-1 the rank of |d_i| in
the tensor (ascending; equal magnitudes ranked by position; p_i = density when n = 1). The
draws are seeded like DARE's masks: keep_i = u_i < p_i, u ~ U[0, 1) from a generator seeded by
sha256(seed, expert, tensor), drawn on the CPU, so a merge is the same on every device.

Where it follows and where it differs from mergekit's method of the same name: docs/method.md,
"Decisions the specification leaves open".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lata.methods import MergeMethod, merge_method, ties_variant
from lata.methods.dare import mask_seed
from lata.registry import ConfigError, in_range


def keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p_i for one flat tensor of magnitudes (float64 ranks, returned as float32)."""
    n = magnitudes.numel()
    order = torch.sort(magnitudes, stable=True).indices
    ranks = torch.empty(n, dtype=torch.float64, device=magnitudes.device)
    ranks[order] = torch.arange(n, dtype=torch.float64, device=magnitudes.device)
    ramp = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * ramp).float()


def rescaled_keep(magnitudes: torch.Tensor, density: float, epsilon: float, seed: int, expert: str,
                  tensor: str) -> torch.Tensor:
    """s_i = 1/p_i where value i is kept, else 0 (float32, flat, on the magnitudes' device)."""
    p = keep_probabilities(magnitudes, density, epsilon)
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, expert, tensor))
    draws = torch.rand(p.numel(), generator=generator).to(p.device)
    return torch.where(draws < p, p.reciprocal(), torch.zeros((), dtype=p.dtype, device=p.device))


@merge_method("della_linear")
@dataclass(frozen=True)
class DellaLinear(MergeMethod):
    """MagPrune each v_k (rank-dependent keep probability, kept values rescaled by 1/p); sum."""

    density: float = 0.5
    epsilon: float = 0.15
    seed: int = 0
    mergekit: ClassVar[str] = "della_linear"

    def check(self):
        in_range("merge.density", self.density, 0.0, 1.0, low_open=True)
        in_range("merge.epsilon", self.epsilon, 0.0, 1.0)
        if not (self.density - self.epsilon > 0 and self.density + self.epsilon <= 1):
            raise ConfigError(f"merge.density={self.density} and merge.epsilon={self.epsilon}: the keep "
                              "probabilities density - epsilon .. density + epsilon must lie in (0, 1]")

    def mergekit_parameters(self):
        return {"density": self.density, "epsilon": self.epsilon}

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """Each expert's s_i (``rescaled_keep``) over the flattened tensor."""
        return vectors.each_magnitude(lambda i, magnitudes: rescaled_keep(
            magnitudes, self.density, self.epsilon, self.seed, experts[i], tensor))

    def kept(self, v, scales, start, stop):
        return v.mul_(scales[start:stop].to(v.device))


#: DELLA: MagPrune's rescaled values, lambda-scaled, then TIES sign election and disjoint mean
#: (mergekit's and the paper's name for it is plain ``della``)
Della = ties_variant(DellaLinear, "della", mergekit="della")
