"""Task Arithmetic: theta = theta_0 + sum_k lambda_k v_k."""

from __future__ import annotations

from typing import Sequence

import torch


def task_arithmetic(vectors: Sequence[torch.Tensor], lams: Sequence[float]) -> torch.Tensor:
    """sum_k lambda_k v_k, accumulated in the vectors' dtype (float32 in the engine)."""
    total = torch.zeros_like(vectors[0])
    for lam, v in zip(lams, vectors):
        total.add_(v, alpha=lam)
    return total
