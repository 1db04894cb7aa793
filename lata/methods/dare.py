"""DARE: drop each value of v_k with probability p, rescale the kept by 1/(1 - p) (docs/method.md,
`dare`, `dare_ties`).

Decision: masks are drawn on the CPU from a torch.Generator seeded by sha256(seed, expert,
tensor), so a merge is identical whatever the device, the tensor order or the thread count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from lata.methods import MergeMethod, merge_method, ties_variant
from lata.registry import in_range


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(shape: torch.Size | Sequence[int], p: float, seed: int, expert: str, tensor: str) -> torch.Tensor:
    """m ~ Bernoulli(1 - p) elementwise (True = keep), reproducible from (seed, expert, tensor)."""
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, expert, tensor))
    return torch.rand(tuple(shape), generator=generator) < (1.0 - p)


def rescale_kept(v: torch.Tensor, mask: torch.Tensor, lam: float, p: float) -> torch.Tensor:
    """u = lambda * m * v / (1 - p) for a given mask m (any slice of the tensor with its mask):
    one multiply of v by lambda / (1 - p)."""
    mask = mask.to(v.device).view(v.shape)
    return torch.where(mask, v * (lam / (1.0 - p)), torch.zeros((), dtype=v.dtype, device=v.device))


def summed_from_zero(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """0 + sum_k u_k: each u_k added in order to a new zero tensor (where every u_k is -0.0 the
    sum is +0.0, where ``summed`` gives -0.0)."""
    total = torch.zeros_like(us[0])
    for u in us:
        total += u
    return total


@merge_method("dare")
@dataclass(frozen=True)
class Dare(MergeMethod):
    """DARE: delta = sum_k lambda_k m_k v_k / (1 - p), m_k ~ Bernoulli(1 - p) seeded by
    (seed, expert, tensor).

    ``contributions`` is DARE's own: lambda_k is folded into the rescale, u_k = m_k v_k *
    (lambda_k / (1 - p)) in one multiply, where ``kept`` followed by the lambda scaling would
    round twice. The sum starts from a zero tensor (``summed_from_zero``)."""

    p: float = 0.9
    seed: int = 0
    consensus: ClassVar = staticmethod(summed_from_zero)
    mergekit: ClassVar[str] = "dare_linear"

    def check(self):
        in_range("merge.p", self.p, 0.0, 1.0, high_open=True)

    def mergekit_parameters(self):
        return {"density": round(1.0 - self.p, 12)}  # the kept fraction (mergekit draws its own masks)

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """Each expert's keep mask over the flattened tensor."""
        return [keep_mask(vectors.shape, self.p, self.seed, e, tensor).reshape(-1) for e in experts]

    def kept(self, v, mask, start, stop):
        return rescale_kept(v, mask[start:stop], 1.0, self.p)

    def contributions(self, vectors, lams, state, start, stop):
        return [rescale_kept(v, m[start:stop], lam, self.p) for v, lam, m in zip(vectors, lams, state)]


DareTies = ties_variant(Dare, "dare_ties", mergekit="dare_ties")
