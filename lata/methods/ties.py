"""TIES: magnitude trim, sign election, disjoint mean (LATA_SPEC `ties`).

Decisions the spec leaves open:
- k = ceil(density * n) is taken with a 1e-9 relative tolerance, so float artefacts such as
  0.07 * 100 = 7.000000000000001 keep 7 values, not 8; at least one value is kept when n > 0.
- The global (whole-model) threshold is found exactly, with two streaming passes of 65,536-bin
  histograms over the float32 bit patterns of |v| (non-negative floats order like their bits):
  memory is constant, and no expert is ever held whole.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

_BINS = 1 << 16


def keep_count(n: int, density: float) -> int:
    """k = ceil(density * n), at least 1 for n > 0."""
    if n == 0:
        return 0
    return max(1, math.ceil(density * n * (1 - 1e-9)))


def kth_largest_magnitude(v: torch.Tensor, k: int) -> float:
    """The k-th largest |value| of a tensor."""
    flat = v.detach().abs().flatten()
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def tensor_threshold(v: torch.Tensor, density: float) -> float:
    """Magnitude threshold that keeps the top ``density`` fraction of one tensor (and ties)."""
    return kth_largest_magnitude(v, keep_count(v.numel(), density))


def _magnitude_bits(v: torch.Tensor) -> torch.Tensor:
    return v.detach().float().abs().contiguous().view(torch.int32).flatten()


def global_threshold(tensors: Callable[[], Iterable[torch.Tensor]], density: float) -> float:
    """Exact k-th largest |value| over every tensor that ``tensors()`` yields (called twice)."""
    high = torch.zeros(_BINS, dtype=torch.int64)
    n = 0
    for v in tensors():
        bits = _magnitude_bits(v)
        high += torch.bincount((bits >> 16).long(), minlength=_BINS).cpu()
        n += bits.numel()
    k = keep_count(n, density)
    if k == 0:
        return 0.0
    hi, rank = _bin_holding(high, k)
    low = torch.zeros(_BINS, dtype=torch.int64)
    for v in tensors():
        bits = _magnitude_bits(v)
        in_bin = bits[(bits >> 16) == hi]
        low += torch.bincount((in_bin & 0xFFFF).long(), minlength=_BINS).cpu()
    lo, _ = _bin_holding(low, rank)
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32)[0])


def _bin_holding(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest value, and that value's rank (1-based) inside the bin."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([k]))[0])
    above = int(from_top[i - 1]) if i > 0 else 0
    return _BINS - 1 - i, k - above


def trim(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the values with |v| >= threshold, zero the rest."""
    return torch.where(v.abs() >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))


def disjoint_mean(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sign election and disjoint mean of already-scaled contributions u_k.

    gamma = sign(sum_k u_k); the mean over the k with sign(u_k) = gamma and u_k != 0; 0 where
    no contribution agrees.
    """
    stacked = torch.stack(list(us))
    gamma = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    count = agree.sum(0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def ties(vectors: Sequence[torch.Tensor], lams: Sequence[float], thresholds: Sequence[float]) -> torch.Tensor:
    """TIES merge of one tensor given each expert's magnitude threshold (tensor or global scope)."""
    return disjoint_mean([lam * trim(v, t) for v, lam, t in zip(vectors, lams, thresholds)])
