"""DARE: drop each value of v_k with probability p, rescale the kept by 1/(1 - p) (LATA_SPEC
`dare`, `dare_ties`).

Decision: masks are drawn on the CPU from a torch.Generator seeded by sha256(seed, expert,
tensor), so a merge is identical whatever the device, the tensor order or the thread count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from lata.methods import MergeMethod, merge_method
from lata.methods.ties import disjoint_mean
from lata.registry import in_range


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(shape: torch.Size | Sequence[int], p: float, seed: int, expert: str, tensor: str) -> torch.Tensor:
    """m ~ Bernoulli(1 - p) elementwise (True = keep), reproducible from (seed, expert, tensor)."""
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, expert, tensor))
    return torch.rand(tuple(shape), generator=generator) < (1.0 - p)


def rescale_kept(v: torch.Tensor, mask: torch.Tensor, lam: float, p: float) -> torch.Tensor:
    """u = lambda * m * v / (1 - p) for a given mask m (any slice of the tensor with its mask)."""
    mask = mask.to(v.device).view(v.shape)
    return torch.where(mask, v * (lam / (1.0 - p)), torch.zeros((), dtype=v.dtype, device=v.device))


@merge_method("dare")
@dataclass(frozen=True)
class Dare(MergeMethod):
    """DARE: delta = sum_k lambda_k m_k v_k / (1 - p), m_k ~ Bernoulli(1 - p) seeded by
    (seed, expert, tensor)."""

    p: float = 0.9
    seed: int = 0
    mergekit: ClassVar[str] = "dare_linear"

    def check(self):
        in_range("merge.p", self.p, 0.0, 1.0, high_open=True)

    def mergekit_parameters(self):
        return {"density": round(1.0 - self.p, 12)}  # the kept fraction (mergekit draws its own masks)

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        return [keep_mask(vectors.shape, self.p, self.seed, e, tensor).reshape(-1) for e in experts]

    def _contributions(self, vectors, lams, masks, start, stop):
        return [rescale_kept(v, m[start:stop], lam, self.p) for v, lam, m in zip(vectors, lams, masks)]

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        total = torch.zeros_like(vectors[0])
        for u in self._contributions(vectors, lams, state, start, stop):
            total += u
        return total


@merge_method("dare_ties")
@dataclass(frozen=True)
class DareTies(Dare):
    """DARE's rescaled contributions, then TIES sign election and disjoint mean."""

    mergekit: ClassVar[str] = "dare_ties"
    mergekit_normalize: ClassVar[bool] = True

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return disjoint_mean(self._contributions(vectors, lams, state, start, stop))
