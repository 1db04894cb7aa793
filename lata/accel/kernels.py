"""Fused CPU kernels (numba) for both streaming passes: one loop over cache-sized blocks.

The torch path does each step of a merge (widen to float32, subtract, scale, trim, elect, add,
cast) as its own operation over a slice: some twenty passes over memory for TIES. These kernels
do the same float32 operations, in the same order, element by element over blocks of BLOCK
values, so a merge gives the same values as the torch path (``torch.equal``; only the sign of a
zero added to a theta_0 of -0.0 may differ) with a fraction of the memory traffic.

- Merge: ``FusedSlices.ta`` / ``.ties`` write theta_0 + delta of a slice straight into the
  output buffer. For the TIES thresholds, ``.band`` counts the |theta_k - theta_0| above a band
  and gathers those in it (``lata.selection.band_around``), and ``.magnitudes`` gives them
  all where a tensor is selected whole (numpy's introselect).
- Similarity pass: ``gram`` sums the float32 products per block by halving (pairwise) and adds
  the blocks in float64. Decision: this differs from the torch path (float32 ``torch.dot`` over
  a slice of 2^18) in the last digits, and is the more exact (pairwise float32 sums and a
  float64 total carry less rounding than one float32 accumulator; docs/performance.md). Each
  path gives the same bits whatever the thread count; switching paths may move a similarity in
  its last float32 digits.

Inputs are read from the checkpoints' memory maps as bit patterns: bfloat16 (widened to float32
by a 16-bit shift, exact) or float32; outputs are bfloat16 (round to nearest even, NaN to
0x7FC0, as torch casts) or float32. Anything else (float16, mixed input dtypes, an accelerator)
takes the torch path, as does every merge where numba is missing or fails to load, or when
``LATA_KERNELS=torch`` is set.

What they save on the 1.1B shape is in docs/performance.md ("Numbers behind the defaults").

Decision: numba (a maintained JIT with an on-disk cache of machine code), not a C extension,
so installing lata never needs a compiler. Its cost is a fixed time in each new process, to
import numba and load the cached code (docs/performance.md); ``preload`` does that in a
background thread, started by the CLI (large local families, before torch loads) and at the
start of either pass.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import threading
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

BLOCK = 2048  # elements per block: each row of float32 temporaries is 8 KiB (L1-sized)
#: Decision: the kernels run for families of at least this many bytes (all models together):
#: loading numba costs a fixed time per process, and they save time in proportion to the bytes
#: read, so small families are faster without them (docs/performance.md).
MIN_BYTES = 4 * 10**9
#: values per slice handed to a worker (both passes): the kernels' temporaries are per BLOCK
#: whatever the slice, so larger slices only cut the thread pool's fixed cost per slice (most
#: of it holding the GIL).
SLICE = 1 << 20
#: dtypes the kernels read and write -> (torch view dtype, numpy dtype) of their bit patterns
#: (by name: importing this module does not import torch)
_BITS = {"torch.bfloat16": ("int16", np.uint16), "torch.float32": ("int32", np.uint32)}


@functools.cache
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _wanted() -> bool:
    """Not turned off (``LATA_KERNELS=torch``) and numba installed (checked without importing it)."""
    return os.environ.get("LATA_KERNELS", "auto") != "torch" and _numba_installed()


def worthwhile(nbytes: int, device: str = "cpu") -> bool:
    """Whether a family of ``nbytes`` computed on ``device`` is worth loading the kernels for."""
    return nbytes >= MIN_BYTES and device.split(":")[0] == "cpu" and _wanted()


def available() -> bool:
    """Whether the fused kernels can run here: wanted, and numba loads (waits for ``preload``)."""
    return _wanted() and _compiled_kernels() is not None


def supports(dtypes: Sequence[torch.dtype], out_dtype: torch.dtype | None, device: str) -> bool:
    """Whether work on inputs in ``dtypes`` (into ``out_dtype``, if any) on ``device`` can be fused."""
    import torch

    return (available() and torch.device(device).type == "cpu" and len(set(dtypes)) == 1
            and str(dtypes[0]) in _BITS and (out_dtype is None or str(out_dtype) in _BITS))


def bits(t: torch.Tensor) -> np.ndarray:
    """A flat bfloat16/float32 CPU tensor as a numpy array of its bit patterns (no copy)."""
    import torch

    view_dtype, np_dtype = _BITS[str(t.dtype)]
    return t.view(getattr(torch, view_dtype)).numpy().view(np_dtype)


def _widen(src, row):
    """row[:] = the float32 bit patterns of src (bfloat16 or float32 patterns, same length)."""
    shift = np.uint32(16 if src.itemsize == 2 else 0)
    for j in range(row.size):
        row[j] = np.uint32(src[j]) << shift


def _store(f_bits, out):
    """out[:] = the float32 patterns f_bits, rounded to nearest even if out holds bfloat16;
    returns 1 if any value written is not finite (NaN, or Inf after rounding), else 0."""
    top = np.uint32(0)  # the largest |x| pattern: NaN's lie above Inf's, Inf's above every finite value
    if out.itemsize == 2:
        for j in range(out.size):
            x = f_bits[j]
            top = max(top, x & np.uint32(0x7FFFFFFF))
            if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: torch writes 0x7FC0
                out[j] = np.uint16(0x7FC0)
            else:
                out[j] = (x + ((x >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16)
        return np.int64(top >= np.uint32(0x7F7F8000))  # from there on, |x| rounds to Inf in bfloat16
    for j in range(out.size):
        x = f_bits[j]
        top = max(top, x & np.uint32(0x7FFFFFFF))
        out[j] = x
    return np.int64(top >= np.uint32(0x7F800000))


def _rows(count):
    """``count`` float32 rows of BLOCK elements and their uint32 bit views."""
    raw = np.empty((count, BLOCK), np.uint32)
    return raw, raw.view(np.float32)


def _ta(theta0, experts, ws, lams, out, start, stop):
    """out[i] = theta0 + sum_k lams[k] * (ws[k] * (theta_k - theta0)), i in [start, stop);
    returns how many blocks hold a value written that is not finite."""
    bad = 0
    t0_bits, t0 = _rows(1)
    e_bits, e = _rows(1)
    acc_bits, acc = _rows(1)
    for s in range(start, stop, BLOCK):
        m = min(BLOCK, stop - s)
        a, x, y = t0[0, :m], e[0, :m], acc[0, :m]
        _widen(theta0[s:s + m], t0_bits[0, :m])
        for k in range(len(experts)):
            _widen(experts[k][s:s + m], e_bits[0, :m])
            w, lam = ws[k], lams[k]
            if k == 0:
                for j in range(m):
                    y[j] = (x[j] - a[j]) * w * lam
            else:
                for j in range(m):
                    y[j] = y[j] + (x[j] - a[j]) * w * lam
        for j in range(m):
            y[j] = y[j] + a[j]
        bad += _store(acc_bits[0, :m], out[s:s + m])
    return bad


def _ties(theta0, experts, ws, lams, keep_above, out, start, stop):
    """TIES (trim, elect, disjoint mean) of elements [start, stop), as ``lata.methods.ties.Ties.delta_chunk``;
    returns how many blocks hold a value written that is not finite."""
    bad = 0
    K = len(experts)
    t0_bits, t0 = _rows(1)
    u_bits, u = _rows(K)
    acc_bits, acc = _rows(3)  # gamma, total, count
    zero, one = np.float32(0.0), np.float32(1.0)
    for s in range(start, stop, BLOCK):
        m = min(BLOCK, stop - s)
        a, g, total, count = t0[0, :m], acc[0, :m], acc[1, :m], acc[2, :m]
        _widen(theta0[s:s + m], t0_bits[0, :m])
        for k in range(K):
            _widen(experts[k][s:s + m], u_bits[k, :m])
            x, w, lam, b = u[k, :m], ws[k], lams[k], keep_above[k]
            for j in range(m):  # u_k = lam * trim(w * (theta_k - theta0)), in place
                v = (x[j] - a[j]) * w
                mag = abs(v)
                x[j] = math.copysign(mag if mag > b else zero, v) * lam
        x = u[0, :m]
        for j in range(m):
            g[j] = x[j]
        for k in range(1, K):  # gamma = sign(sum_k u_k), summed in expert order
            x = u[k, :m]
            for j in range(m):
                g[j] = g[j] + x[j]
        for j in range(m):
            t = g[j]
            g[j] = one if t > zero else (-one if t < zero else zero)
        for k in range(K):
            x = u[k, :m]
            for j in range(m):
                p = x[j] * g[j]
                agree = p if p > zero else zero
                total[j] = agree if k == 0 else total[j] + agree
                count[j] = (zero if k == 0 else count[j]) + (one if agree > zero else zero)
        for j in range(m):
            c = count[j]
            total[j] = total[j] * g[j] / (c if c > one else one) + a[j]
        bad += _store(acc_bits[1, :m], out[s:s + m])
    return bad


def _magnitudes(theta0, expert, out, start, stop):
    """out[i] = |theta_k - theta0| in float32, i in [start, stop)."""
    t0_bits, t0 = _rows(1)
    e_bits, e = _rows(1)
    for s in range(start, stop, BLOCK):
        m = min(BLOCK, stop - s)
        a, x, y = t0[0, :m], e[0, :m], out[s:s + m]
        _widen(theta0[s:s + m], t0_bits[0, :m])
        _widen(expert[s:s + m], e_bits[0, :m])
        for j in range(m):
            y[j] = abs(x[j] - a[j])


def _band(theta0, expert, lo, hi, out, start, stop):
    """Over [start, stop) of |theta_k - theta0| (float32): how many lie above hi, and those in
    [lo, hi], their bit patterns written in order from out[start]; returns (above, inside).

    Compared as bit patterns (lo, hi: those of non-negative float32 values): non-negative
    floats order like their patterns, and NaN's lie above +inf's, so NaN counts as above, as
    numpy's partition orders it. Branch-free: every value is stored, and the end advances only
    past those in the band.
    """
    t0_bits, t0 = _rows(1)
    e_bits, e = _rows(1)
    width = np.uint32(hi - lo)
    above = 0
    inside = start
    for s in range(start, stop, BLOCK):
        m = min(BLOCK, stop - s)
        a, x, patterns = t0[0, :m], e[0, :m], e_bits[0, :m]
        _widen(theta0[s:s + m], t0_bits[0, :m])
        _widen(expert[s:s + m], e_bits[0, :m])
        for j in range(m):
            x[j] = abs(x[j] - a[j])
        count = np.int32(0)
        for j in range(m):
            p = patterns[j]
            count += np.int32(p > hi)
            out[inside] = p
            inside += np.uint32(p - lo) <= width
        above += count
    return above, inside - start


def _block_sum(tmp, m):
    """sum of tmp[:m] (float32, overwritten): halving pairwise sums, the last 16 added in float64."""
    h = m
    while h > 16:
        half = h // 2
        for j in range(half):
            tmp[j] = tmp[j] + tmp[j + half]
        if h % 2:
            tmp[0] = tmp[0] + tmp[h - 1]
        h = half
    total = 0.0
    for q in range(h):
        total += np.float64(tmp[q])
    return total


def _gram(base, rows, start, stop, out):
    """out[0] = |x_0|^2, out[2r - 1] = <x_r, x_0>, out[2r] = |x_r|^2 over [start, stop), x_r = rows[r] - base.

    Products in float32, summed per block of BLOCK by halving (pairwise), blocks added in
    float64: closer to the float64 sum than ``torch.dot``'s float32 accumulation over a slice.
    """
    R = len(rows)
    b_bits, b = _rows(1)
    x_bits, x = _rows(R)
    t_bits, t = _rows(1)
    for q in range(out.size):
        out[q] = 0.0
    for s in range(start, stop, BLOCK):
        m = min(BLOCK, stop - s)
        a, p = b[0, :m], t[0, :m]
        _widen(base[s:s + m], b_bits[0, :m])
        for r in range(R):
            _widen(rows[r][s:s + m], x_bits[r, :m])
            y = x[r, :m]
            for j in range(m):
                y[j] = y[j] - a[j]
        x0 = x[0, :m]
        for j in range(m):
            p[j] = x0[j] * x0[j]
        out[0] += _block_sum(p, m)
        for r in range(1, R):
            y = x[r, :m]
            for j in range(m):
                p[j] = y[j] * x0[j]
            out[2 * r - 1] += _block_sum(p, m)
            for j in range(m):
                p[j] = y[j] * y[j]
            out[2 * r] += _block_sum(p, m)


_compiled: SimpleNamespace | bool | None = None  # False: numba failed to load
_compile_lock = threading.Lock()


def _compiled_kernels() -> SimpleNamespace | None:
    """The kernels compiled by numba, or None where it fails to load (warned once).

    numba is imported here, on first use, so ``import lata`` stays light; its machine code is
    cached on disk, so a new process loads it instead of compiling.
    """
    global _compiled, _widen, _store, _rows, _block_sum
    with _compile_lock:
        if _compiled is None:
            try:
                import numba

                options = dict(fastmath=False, boundscheck=False, error_model="numpy")
                inline = numba.njit(inline="always", **options)
                # the kernels call these module globals: compiled in place before the kernels are
                _widen, _store, _rows, _block_sum = (inline(f) for f in (_widen, _store, _rows, _block_sum))
                jit = numba.njit(nogil=True, cache=True, **options)
                _compiled = SimpleNamespace(ta=jit(_ta), ties=jit(_ties), magnitudes=jit(_magnitudes),
                                            band=jit(_band), gram=jit(_gram))
            except Exception as exc:  # a broken numba install: merges take the torch path
                warnings.warn(f"lata: numba kernels unavailable ({type(exc).__name__}: {exc}); using torch")
                _compiled = False
    return _compiled or None


_preloading: threading.Thread | None = None


def preload() -> None:
    """Load the kernels (numba's import and its cached machine code) in a background thread,
    so that it overlaps other work instead of delaying the first pass. Once per process;
    nothing where kernels are off."""
    global _preloading
    if _preloading is not None or not _wanted():
        return

    def load() -> None:
        if available():  # imports numba; a first call then loads the cached machine code
            one, scale = np.zeros(1, np.uint16), np.ones(1, np.float32)
            _compiled_kernels().ta(one, (one,), scale, scale, np.zeros(1, np.uint16), 0, 1)

    _preloading = threading.Thread(target=load, name="lata-kernels-preload", daemon=True)
    _preloading.start()


def gram(views: Sequence[torch.Tensor]) -> Callable[[int, int], np.ndarray]:
    """For flat views (base, then R rows), a function of (start, stop) giving, over that range,
    [|x_0|^2, <x_1, x_0>, |x_1|^2, ...] with x_r = row_r - base, float64 sums of float32
    products (see ``_gram``). The views' bit patterns are taken once per tensor, not per slice."""
    base, rows, kernel = bits(views[0]), tuple(bits(v) for v in views[1:]), _compiled_kernels().gram

    def over(start: int, stop: int) -> np.ndarray:
        out = np.empty(2 * len(rows) - 1, np.float64)
        kernel(base, rows, start, stop, out)
        return out

    return over


def _floats(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


class FusedSlices:
    """The fused kernels bound to one tensor: theta_0 and the active experts' flat views (one
    dtype), the weights w_k, and the output buffer."""

    def __init__(self, theta0: torch.Tensor, experts: Sequence[torch.Tensor], ws: Sequence[float],
                 out: torch.Tensor):
        self.theta0 = bits(theta0)
        self.experts = tuple(bits(e) for e in experts)
        self.ws = _floats(ws)
        self.out = bits(out.view(-1))

    def ta(self, lams: Sequence[float], start: int, stop: int) -> int:
        """Task arithmetic of [start, stop) into the output; returns 0 where every value written is finite."""
        return int(_compiled_kernels().ta(self.theta0, self.experts, self.ws, _floats(lams), self.out, start, stop))

    def ties(self, lams: Sequence[float], keep_above: Sequence[float], start: int, stop: int) -> int:
        """TIES keeping |v_k| > keep_above[k] (the float32 just below expert k's threshold);
        returns 0 where every value written is finite."""
        return int(_compiled_kernels().ties(self.theta0, self.experts, self.ws, _floats(lams), _floats(keep_above),
                                            self.out, start, stop))

    def magnitudes(self, k: int, out: torch.Tensor, start: int, stop: int) -> None:
        """|theta_k - theta_0| (unweighted) of elements [start, stop) into the float32 tensor
        ``out`` (flat, same positions)."""
        _compiled_kernels().magnitudes(self.theta0, self.experts[k], out.numpy(), start, stop)

    def sample(self, k: int, positions: np.ndarray) -> np.ndarray:
        """|theta_k - theta_0| (float32) at the given positions."""
        return np.abs(_widened(self.experts[k][positions]) - _widened(self.theta0[positions]))

    def band(self, k: int, lo: float, hi: float, out: np.ndarray, start: int, stop: int) -> tuple[int, int]:
        """Of |theta_k - theta_0| over [start, stop): the count above ``hi`` (NaN included), and
        the count in [lo, hi] (0 <= lo <= hi), those values written in order from ``out[start]``
        (float32)."""
        lo_bits, hi_bits = np.array([lo, hi], np.float32).view(np.uint32)
        above, inside = _compiled_kernels().band(self.theta0, self.experts[k], lo_bits, hi_bits, out.view(np.uint32),
                                                 start, stop)
        return int(above), int(inside)


def _widened(patterns: np.ndarray) -> np.ndarray:
    """bfloat16 or float32 bit patterns as float32 values."""
    wide = patterns.astype(np.uint32)
    if patterns.itemsize == 2:
        wide <<= np.uint32(16)
    return wide.view(np.float32)
