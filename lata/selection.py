"""Exact magnitude selections on streamed tensors: the k-th largest |value| of one tensor (with a
band placed by a sample for large tensors) or of a whole model (two streaming histogram passes).

Used by the engine for every method that keeps values by magnitude (TIES, Breadcrumbs), through
``lata.methods.TensorVectors.kth_largest_magnitudes`` and ``MergeMethod.global_density``.

Decisions:
- k = ceil(density * n) is taken with a 1e-9 relative tolerance, so float artefacts such as
  0.07 * 100 = 7.000000000000001 keep 7 values, not 8; at least one value is kept when n > 0.
- The per-tensor selection is exact: a selection (introselect) on the tensor's magnitudes. On
  the CPU it runs in numpy (``ndarray.partition``, in place on the engine's scratch buffer;
  docs/performance.md compares it with ``torch.kthvalue``). On other devices it is two
  histogram passes over the float32 bit patterns (``kth_largest_by_bits``), as for the global
  threshold: ``torch.kthvalue`` on a GPU selects each row with one thread block, so one large
  tensor would run on one of its many multiprocessors. All return the same value. For large
  tensors the fused CPU kernels first place a band around it
  from a sample (``band_around``), then one pass counts the values above the band and gathers
  those in it (``kth_largest_in_band``): the same exact value without writing and reordering
  every magnitude.
- The global (whole-model) threshold is found exactly, with two streaming passes of
  65,536-bin histograms over the float32 bit patterns of |v| (non-negative floats order like
  their bits): memory is constant, and no expert is ever held whole.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import numpy as np
import torch

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
    if flat.device.type != "cpu" and flat.dtype == torch.float32:
        return kth_largest_by_bits(flat, k)
    return float(torch.kthvalue(flat, n - k + 1).values)


#: values per histogram step of ``kth_largest_by_bits`` (bounds its temporaries)
BITS_STEP = 1 << 24


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values (negative floats: every bit but the sign
    flipped; -0.0 just below +0.0, NaN with a set sign bit first, other NaN last)."""
    bits = values.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def kth_largest_by_bits(values: torch.Tensor, k: int) -> float:
    """The k-th largest of a float32 tensor's values (1 <= k <= n), exactly, on the tensor's own
    device (``_kth_largest_by_histograms`` over steps of ``BITS_STEP`` values)."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for {n} values")
    steps = [flat[start:start + BITS_STEP] for start in range(0, n, BITS_STEP)]
    return _kth_largest_by_histograms(lambda: steps, lambda _: k, signed=True)


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


def global_threshold(tensors: Callable[[], Iterable[torch.Tensor | int]], density: float) -> float:
    """Exact k-th largest |value| over every tensor that ``tensors()`` yields (called twice),
    k = ``keep_count(n, density)`` of all n values.

    An ``int`` item stands for that many zeros (a tensor whose pure vector is 0, never read).
    """
    def magnitudes():
        for v in tensors():
            yield v if isinstance(v, int) else v.detach().float().abs().contiguous().reshape(-1)

    return _kth_largest_by_histograms(magnitudes, lambda n: keep_count(n, density), signed=False)


def _kth_largest_by_histograms(parts: Callable[[], Iterable[torch.Tensor | int]], k_of: Callable[[int], int],
                               signed: bool) -> float:
    """The k-th largest value over the flat float32 tensors ``parts()`` yields (called twice; an
    ``int`` stands for that many zeros), k = ``k_of(n)`` for n values in all (0.0 where k is 0).

    Two passes of 65,536-bin histograms, each on the values' own device: the high 16 bits of
    order-preserving int32 keys find the bin holding the k-th largest, the low 16 bits of that
    bin's keys find the value. ``signed=False`` (values known non-negative): the keys are the
    bit patterns themselves.
    """
    def keys(part: torch.Tensor) -> torch.Tensor:
        return _order_keys(part) if signed else part.view(torch.int32)

    middle = _BINS >> 1  # the high bin of key 0 (+0.0): keys are signed, bins are not
    high, zeros, n = _Counts(), 0, 0
    for part in parts():
        if isinstance(part, int):
            zeros, n = zeros + part, n + part
            continue
        high.add(torch.bincount((keys(part) >> 16) + middle, minlength=_BINS))
        n += part.numel()
    high = high.total()
    high[middle] += zeros
    k = k_of(n)
    if k == 0:
        return 0.0
    hi, rank = _bin_holding(high, k)
    low, zeros = _Counts(), 0
    for part in parts():
        if isinstance(part, int):
            zeros += part
            continue
        key = keys(part)
        low.add(torch.bincount(key[(key >> 16) == hi - middle] & 0xFFFF, minlength=_BINS))
    low = low.total()
    if hi == middle:
        low[0] += zeros
    lo, _ = _bin_holding(low, rank)
    key = ((hi - middle) << 16) | lo  # a signed 32-bit key
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


class _Counts:
    """Histogram counts summed on the device they are counted on (one copy to the CPU at the
    end instead of one wait per tensor)."""

    def __init__(self):
        self._sums: dict[torch.device, torch.Tensor] = {}

    def add(self, counts: torch.Tensor) -> None:
        if counts.device in self._sums:
            self._sums[counts.device] += counts
        else:
            self._sums[counts.device] = counts.clone()

    def total(self) -> torch.Tensor:
        out = torch.zeros(_BINS, dtype=torch.int64)
        for counts in self._sums.values():
            out += counts.cpu()
        return out


def _bin_holding(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest value, and that value's rank (1-based) inside the bin."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([k]))[0])
    above = int(from_top[i - 1]) if i > 0 else 0
    return _BINS - 1 - i, k - above


def largest_below(threshold: float) -> float:
    """The largest float32 strictly below ``threshold`` (|v| > it exactly when |v| >= threshold)."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


#: values per block of a streamed Gram matrix: fixed, so that its sums never depend on how the
#: engine slices a tensor or on which path (sliced, staged) reads it
GRAM_BLOCK = 1 << 18


def block_gram(part: Callable[[int, int], list[torch.Tensor]], n: int, row: int | None = None, *,
               columns: bool = False) -> torch.Tensor:
    """sum v_i * v_j of K streamed vectors of n values, as a float64 [rows, K, K]: over the whole
    vectors (``row`` None: rows = 1), over each row of ``row`` values (n // row rows), or with
    ``columns`` over each of the ``row`` columns of the vectors seen as [n // row, row].

    ``part(start, stop)`` gives the K vectors' values [start, stop). Products and sums are in
    float64, over fixed blocks (``GRAM_BLOCK`` values, or whole rows), added in order: the same
    bits whatever the caller's slicing."""
    if row is None or (row >= n and not columns):
        total = None
        for start in range(0, n, GRAM_BLOCK):
            vs = torch.stack([v.double() for v in part(start, min(n, start + GRAM_BLOCK))])
            block = vs @ vs.T
            total = block if total is None else total.add_(block)
        return total.unsqueeze(0)
    rows, step = n // row, max(1, GRAM_BLOCK // row) * row
    out = None
    for start in range(0, n, step):
        stop = min(n, start + step)
        vs = torch.stack([v.double() for v in part(start, stop)]).view(-1, (stop - start) // row, row)
        if columns:
            block = torch.einsum("irc,jrc->cij", vs, vs)
            out = block if out is None else out.add_(block)
            continue
        block = torch.einsum("irc,jrc->rij", vs, vs)
        if out is None:
            out = torch.empty((rows, *block.shape[1:]), dtype=torch.float64, device=block.device)
        out[start // row:stop // row] = block
    return out


def each_block(part: Callable[[int, int], list[torch.Tensor]], n: int, fn: Callable[[list[torch.Tensor]], Any]) -> list:
    """``[fn(part(start, stop)) for each block of GRAM_BLOCK values, in order]``."""
    return [fn(part(start, min(n, start + GRAM_BLOCK))) for start in range(0, n, GRAM_BLOCK)]
