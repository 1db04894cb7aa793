"""Merge methods: pure tensor functions of (pure vectors v_k, lambdas, options) -> delta.

theta = theta_0 + delta. No I/O, no config objects: the engine hands each method the float32
pure vectors of one tensor. ``build_method`` turns merge options into a method object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lata.methods.dare import dare, dare_ties
from lata.methods.ta import task_arithmetic
from lata.methods.ties import tensor_threshold, ties


@dataclass(frozen=True)
class MergeMethod:
    """Base: ``delta(vectors, lams, experts, tensor, thresholds)`` for one tensor."""

    name = "base"
    #: per-expert whole-model magnitude thresholds the engine must compute first (TIES global)
    needs_global_thresholds = False

    def delta(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
              tensor: str, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    name = "ta"

    def delta(self, vectors, lams, experts, tensor, thresholds=None):
        return task_arithmetic(vectors, lams)


@dataclass(frozen=True)
class Ties(MergeMethod):
    density: float = 0.2
    topk_scope: str = "tensor"
    name = "ties"

    @property
    def needs_global_thresholds(self) -> bool:  # type: ignore[override]
        return self.topk_scope == "global"

    def delta(self, vectors, lams, experts, tensor, thresholds=None):
        if self.topk_scope == "tensor":
            thresholds = [tensor_threshold(v, self.density) for v in vectors]
        elif thresholds is None:
            raise ValueError("TIES with topk_scope=global needs the whole-model thresholds")
        return ties(vectors, lams, thresholds)


@dataclass(frozen=True)
class Dare(MergeMethod):
    p: float = 0.9
    seed: int = 0
    name = "dare"

    def delta(self, vectors, lams, experts, tensor, thresholds=None):
        return dare(vectors, lams, experts, tensor, self.p, self.seed)


@dataclass(frozen=True)
class DareTies(Dare):
    name = "dare_ties"

    def delta(self, vectors, lams, experts, tensor, thresholds=None):
        return dare_ties(vectors, lams, experts, tensor, self.p, self.seed)


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
