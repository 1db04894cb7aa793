"""Task Arithmetic: theta = theta_0 + sum_k lambda_k v_k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from lata.methods import MergeMethod, merge_method


def task_arithmetic(vectors: Sequence[torch.Tensor], lams: Sequence[float]) -> torch.Tensor:
    """sum_k lambda_k v_k, accumulated in the vectors' dtype (float32 in the engine).

    Each product and each sum is one rounded float operation (no fused multiply-add), so the
    result is the same however the tensor is cut into chunks or threads.
    """
    return task_arithmetic_([v.clone() for v in vectors], lams)


def task_arithmetic_(vectors: Sequence[torch.Tensor], lams: Sequence[float]) -> torch.Tensor:
    """``task_arithmetic`` computed in place in the vectors (scratch buffers): the same values."""
    total = None
    for lam, v in zip(lams, vectors):
        term = v.mul_(lam) if lam != 1.0 else v
        total = term if total is None else total.add_(term)
    return total


@merge_method("ta")
@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Task Arithmetic: delta = sum_k lambda_k v_k (no parameters of its own)."""

    fused: ClassVar[bool] = True
    mergekit: ClassVar[str] = "task_arithmetic"

    def fused_chunk(self, slices, lams, state, start, stop):
        return slices.ta(lams, start, stop)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        return task_arithmetic_(vectors, lams)
