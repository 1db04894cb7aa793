"""TIES: magnitude trim, sign election, disjoint mean (LATA_SPEC `ties`).

Decisions the spec leaves open:
- k = ceil(density * n) is taken with a 1e-9 relative tolerance, so float artefacts such as
  0.07 * 100 = 7.000000000000001 keep 7 values, not 8; at least one value is kept when n > 0.
- The per-tensor threshold (the k-th largest |v|) is exact: a selection (introselect) on the
  tensor's magnitudes. On the CPU it runs in numpy (``ndarray.partition``, in place on the
  engine's scratch buffer), about 10x faster than ``torch.kthvalue`` there; on other devices
  ``torch.kthvalue``. Both return the same value. For large tensors the fused CPU kernels
  first place a band around it from a sample (``band_around``), then one pass counts the values
  above the band and gathers those in it (``kth_largest_in_band``): the same exact value
  without writing and reordering every magnitude.
- The global (whole-model) threshold is found exactly, with two streaming passes of 65,536-bin
  histograms over the float32 bit patterns of |v| (non-negative floats order like their bits):
  memory is constant, and no expert is ever held whole.
- Once the thresholds are known, trim, election and mean are elementwise, written with
  arithmetic (threshold, copysign, relu, sign) rather than boolean masks: the same values,
  several times faster on the CPU, and the same in any slicing of the tensor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lata.methods import MergeMethod, merge_method
from lata.registry import in_range, one_of

_BINS = 1 << 16


def keep_count(n: int, density: float) -> int:
    """k = ceil(density * n), at least 1 for n > 0."""
    if n == 0:
        return 0
    return max(1, math.ceil(density * n * (1 - 1e-9)))


def kth_largest(values: torch.Tensor, k: int, *, scratch: bool = False) -> float:
    """The k-th largest of a tensor's values (1 <= k <= n), exactly.

    ``scratch=True`` allows reordering ``values`` in place (no copy).
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for {n} values")
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        array = flat.numpy() if scratch and flat.is_contiguous() else flat.numpy().copy()
        array.partition(n - k)
        return float(array[n - k])
    return float(torch.kthvalue(flat, n - k + 1).values)


def kth_largest_magnitude(v: torch.Tensor, k: int) -> float:
    """The k-th largest |value| of a tensor."""
    return kth_largest(v.detach().abs().float(), k, scratch=True)


#: values drawn (at fixed pseudo-random positions) to place the band of ``band_around``
BAND_SAMPLE = 1 << 14
#: the band reaches this many binomial standard deviations (plus a few ranks) either side of
#: the k-th largest's expected place in the sample: a miss (under 1 in 16,000) only costs a
#: selection on all the values
BAND_SIGMAS = 4.0


@functools.lru_cache(maxsize=16)
def sample_positions(n: int, count: int = BAND_SAMPLE) -> np.ndarray:
    """``count`` positions in [0, n), sorted, the same every time for the same n (a fixed seed)."""
    return np.sort(np.random.default_rng(n).integers(0, n, size=min(count, n)))


def band_around(sample: np.ndarray, n: int, k: int) -> tuple[float, float] | None:
    """(lo, hi): where the k-th largest of n non-negative values lies, almost surely, judged by a
    sample of them: the sample's values around rank k * s / n (s the sample size), widened by
    ``BAND_SIGMAS`` standard deviations. hi is +inf when the band reaches the top. None when the
    sample holds a NaN (the caller selects the whole tensor)."""
    s = sample.size
    if s == 0 or np.isnan(sample).any():
        return None
    p = k / n
    expected = p * s
    margin = BAND_SIGMAS * math.sqrt(s * p * (1 - p)) + 4
    top, bottom = math.floor(expected - margin), math.ceil(expected + margin)  # ranks from the largest
    ranks = [r for r in (top, bottom) if 1 <= r <= s]
    ordered = np.partition(sample, [s - r for r in ranks]) if ranks else sample
    hi = float(ordered[s - top]) if top >= 1 else math.inf
    lo = float(ordered[s - bottom]) if bottom <= s else 0.0
    return lo, hi


def kth_largest_in_band(k: int, above: int, inside: np.ndarray) -> float | None:
    """The k-th largest of some values, exactly, knowing only how many lie above a band
    (``above``; NaN counted there, as numpy orders it) and the values in the band (``inside``,
    float32, reordered here). When the k-th largest falls in the band it is the (k - above)-th
    largest of the band's values; otherwise (a band the sample misplaced) None, and the caller
    selects on every value: the result never depends on the sample.
    """
    if not above < k <= above + inside.size:
        return None
    return kth_largest(torch.from_numpy(inside), k - above, scratch=True)


def scaled_magnitude(t: float, w: float) -> float:
    """The k-th largest |w * d| (float32 products) given t, the k-th largest |d|: fl(|w| * t).

    Exact: |fl(w * d)| = fl(|w| * |d|) (rounding is symmetric) and fl(|w| * x) does not decrease
    as x grows (rounding is monotone), so scaling keeps the order of the magnitudes; values that
    round together stay together. So one selection on |d| serves every weight w.
    """
    return t if w == 1.0 else float(np.float32(abs(w)) * np.float32(t))


def tensor_threshold(v: torch.Tensor, density: float) -> float:
    """Magnitude threshold that keeps the top ``density`` fraction of one tensor (and ties)."""
    return kth_largest_magnitude(v, keep_count(v.numel(), density))


def _magnitude_bits(v: torch.Tensor) -> torch.Tensor:
    return v.detach().float().abs().contiguous().view(torch.int32).flatten()


def global_threshold(tensors: Callable[[], Iterable[torch.Tensor | int]], density: float) -> float:
    """Exact k-th largest |value| over every tensor that ``tensors()`` yields (called twice).

    An ``int`` item stands for that many zeros (a tensor whose pure vector is 0, never read).
    """
    high = torch.zeros(_BINS, dtype=torch.int64)
    n = 0
    for v in tensors():
        if isinstance(v, int):
            high[0] += v
            n += v
            continue
        bits = _magnitude_bits(v)
        high += torch.bincount((bits >> 16).long(), minlength=_BINS).cpu()
        n += bits.numel()
    k = keep_count(n, density)
    if k == 0:
        return 0.0
    hi, rank = _bin_holding(high, k)
    low = torch.zeros(_BINS, dtype=torch.int64)
    for v in tensors():
        if isinstance(v, int):
            if hi == 0:
                low[0] += v
            continue
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


def largest_below(threshold: float) -> float:
    """The largest float32 strictly below ``threshold`` (|v| > it exactly when |v| >= threshold)."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def trim(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the values with |v| >= threshold, zero the rest (a new tensor)."""
    if v.dtype != torch.float32 or np.float32(threshold) != threshold:
        return torch.where(v.abs() >= threshold, v, torch.zeros((), dtype=v.dtype, device=v.device))
    kept = F.threshold_(v.abs(), largest_below(threshold), 0.0)  # |v| where |v| > below(t), else 0
    return kept.copysign_(v)


def disjoint_mean(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sign election and disjoint mean of already-scaled contributions u_k.

    gamma = sign(sum_k u_k); the mean over the k with sign(u_k) = gamma and u_k != 0; 0 where
    no contribution agrees. Written without masks: u_k agrees exactly when relu(u_k * gamma) > 0
    (gamma is -1, 0 or 1, so the product is exact), and the mean is gamma * sum_k relu(u_k *
    gamma) / max(count, 1), the same sum as that of the agreeing u_k with the sign taken out.
    """
    us = list(us)
    gamma = us[0] + us[1] if len(us) > 1 else us[0].clone()
    for u in us[2:]:
        gamma.add_(u)
    gamma.sign_()
    total = count = None
    for u in us:
        agreeing = torch.mul(u, gamma).relu_()
        if total is None:
            total, count = agreeing, torch.sign(agreeing)
        else:
            total.add_(agreeing)
            count.add_(torch.sign(agreeing))
    return total.mul_(gamma).div_(count.clamp_(min=1.0))


def ties(vectors: Sequence[torch.Tensor], lams: Sequence[float], thresholds: Sequence[float]) -> torch.Tensor:
    """TIES merge of one tensor given each expert's magnitude threshold (tensor or global scope)."""
    us = []
    for v, lam, t in zip(vectors, lams, thresholds):
        u = trim(v, t)
        if lam != 1.0:
            u.mul_(lam)
        us.append(u)
    return disjoint_mean(us)


@merge_method("ties")
@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: keep the ``density`` fraction of each v_k by magnitude (per tensor, or over the whole
    model with ``topk_scope=global``), elect signs, disjoint mean of lambda_k-scaled values."""

    density: float = 0.2
    topk_scope: str = "tensor"
    fused: ClassVar[bool] = True

    def check(self):
        in_range("merge.density", self.density, 0.0, 1.0, low_open=True)
        one_of("merge.topk_scope", self.topk_scope, ("tensor", "global"))

    @property
    def global_density(self):
        return self.density if self.topk_scope == "global" else None

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        if self.topk_scope == "tensor":
            return vectors.kth_largest_magnitudes(keep_count(vectors.shape.numel(), self.density))
        if thresholds is None:
            raise ValueError("TIES with topk_scope=global needs the whole-model thresholds")
        return list(thresholds)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return ties(vectors, lams, state)

    def fused_chunk(self, slices, lams, state, start, stop):
        return slices.ties(lams, [largest_below(t) for t in state], start, stop)
