"""Task Arithmetic: theta = theta_0 + sum_k lambda_k v_k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lata.methods import MergeMethod, merge_method


@merge_method("ta")
@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Task Arithmetic: delta = sum_k lambda_k v_k (no parameters of its own): every value kept,
    summed. Each product and each sum is one rounded float operation (no fused multiply-add), so
    the result is the same however the tensor is cut into chunks or threads."""

    fused: ClassVar[bool] = True
    mergekit: ClassVar[str] = "task_arithmetic"

    def fused_chunk(self, slices, lams, state, start, stop):
        return slices.ta(lams, start, stop)
