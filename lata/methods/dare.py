"""DARE's masks and rescaling (LATA_SPEC `dare`, `dare_ties`: the methods are in ``lata.methods``).

Decision: masks are drawn on the CPU from a torch.Generator seeded by sha256(seed, expert,
tensor), so a merge is identical whatever the device, the tensor order or the thread count.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


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
