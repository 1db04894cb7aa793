"""Merge methods: pure tensor functions of (pure vectors v_k, lambdas, options) -> delta.

theta = theta_0 + delta. No I/O, no config objects: the engine hands each method the float32
pure vectors of one tensor. ``build_method`` turns merge options into a method object.

Every method is elementwise once it has seen the whole tensor: ``prepare`` takes what needs the
whole tensor (TIES: each expert's magnitude threshold; DARE: the seeded masks) and
``delta_chunk`` computes the delta of any slice of the flattened tensor from the vectors' values
in that slice. The engine streams large tensors through ``delta_chunk`` in slices (bounded
memory, cache-sized work); ``delta`` is the same on the whole tensor at once, and gives the
same values whatever the slicing. A method with ``fused = True`` also has ``fused_chunk``: the
same slice computed by a numba kernel (``lata.kernels``) straight from the stored inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from lata.kernels import FusedSlices
from lata.methods.dare import keep_mask, rescale_kept
from lata.methods.ta import task_arithmetic_
from lata.methods.ties import disjoint_mean, keep_count, kth_largest_magnitude, largest_below, ties


class TensorVectors(Protocol):
    """The pure vectors v_k of one tensor, as the engine offers them to ``prepare``."""

    shape: torch.Size

    def kth_largest_magnitudes(self, k: int) -> list[float]:
        """The k-th largest |v_k| of each expert's vector, exactly."""


class _WholeVectors:
    """``TensorVectors`` over already-computed whole tensors (``MergeMethod.delta``)."""

    def __init__(self, vectors: Sequence[torch.Tensor]):
        self.vectors = list(vectors)
        self.shape = self.vectors[0].shape

    def kth_largest_magnitudes(self, k):
        return [kth_largest_magnitude(v, k) for v in self.vectors]


@dataclass(frozen=True)
class MergeMethod:
    """Base: ``prepare`` + ``delta_chunk``; ``delta(vectors, lams, experts, tensor, thresholds)`` for one tensor."""

    name = "base"
    #: per-expert whole-model magnitude thresholds the engine must compute first (TIES global)
    needs_global_thresholds = False
    #: ``fused_chunk`` exists: a fused CPU kernel computes theta_0 + delta (``lata.kernels``)
    fused = False

    def prepare(self, vectors: TensorVectors, lams: Sequence[float], experts: Sequence[str], tensor: str,
                thresholds: Sequence[float] | None = None) -> Any:
        """What ``delta_chunk`` needs from the whole tensor (nothing, by default)."""
        return None

    def delta_chunk(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
                    tensor: str, state: Any, start: int, stop: int) -> torch.Tensor:
        """The delta of elements [start, stop) of the flattened tensor, from the vectors' slices.

        The vectors are scratch: the method may overwrite them (and return one of them).
        """
        raise NotImplementedError

    def fused_chunk(self, slices: FusedSlices, lams: Sequence[float], state: Any, start: int, stop: int) -> int:
        """theta_0 + delta of elements [start, stop), written by a fused kernel into the output
        that ``slices`` holds: the same values as ``delta_chunk`` plus theta_0. Returns 0 where
        every value written is finite."""
        raise NotImplementedError

    def delta(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
              tensor: str, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        shape = vectors[0].shape
        state = self.prepare(_WholeVectors(vectors), lams, experts, tensor, thresholds)
        flat = [v.reshape(-1).clone() for v in vectors]  # delta_chunk may overwrite them
        return self.delta_chunk(flat, lams, experts, tensor, state, 0, flat[0].numel()).view(shape)


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    name = "ta"
    fused = True

    def fused_chunk(self, slices, lams, state, start, stop):
        return slices.ta(lams, start, stop)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return task_arithmetic_(vectors, lams)


@dataclass(frozen=True)
class Ties(MergeMethod):
    density: float = 0.2
    topk_scope: str = "tensor"
    name = "ties"
    fused = True

    @property
    def needs_global_thresholds(self) -> bool:  # type: ignore[override]
        return self.topk_scope == "global"

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


@dataclass(frozen=True)
class Dare(MergeMethod):
    p: float = 0.9
    seed: int = 0
    name = "dare"

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        return [keep_mask(vectors.shape, self.p, self.seed, e, tensor).reshape(-1) for e in experts]

    def _contributions(self, vectors, lams, masks, start, stop):
        return [rescale_kept(v, m[start:stop], lam, self.p) for v, lam, m in zip(vectors, lams, masks)]

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        total = torch.zeros_like(vectors[0])
        for u in self._contributions(vectors, lams, state, start, stop):
            total += u
        return total


@dataclass(frozen=True)
class DareTies(Dare):
    name = "dare_ties"

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return disjoint_mean(self._contributions(vectors, lams, state, start, stop))


def build_method(method: str, *, density: float = 0.2, topk_scope: str = "tensor", p: float = 0.9,
                 seed: int = 0, **_ignored) -> MergeMethod:
    """Method object from merge options (keys of other methods are ignored)."""
    if method == "ta":
        return TaskArithmetic()
    if method == "ties":
        return Ties(density=density, topk_scope=topk_scope)
    if method == "dare":
        return Dare(p=p, seed=seed)
    if method == "dare_ties":
        return DareTies(p=p, seed=seed)
    raise ValueError(f"unknown merge method '{method}'; choose one of: ta, ties, dare, dare_ties")
