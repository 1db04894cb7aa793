"""Layer similarities -> per-layer weights w_{l,k} (LATA_SPEC "Layer weights").

Pure functions of numbers: no tensors, no I/O, no config objects.

Decisions the spec leaves open:
- ``D = round(drop * L)`` rounds half up (``floor(x + 0.5)``), not Python's half-to-even, so
  drop=0.5 with L=5 drops 3 layers, as a reader of the formula would expect.
- ``normalize=mean`` with every weight 0 (nothing to rescale) is an error, not a division by 0.
"""

from __future__ import annotations

import math
from typing import Sequence


def rank_positions(similarities: Sequence[float]) -> list[int]:
    """p for each layer: 0 = most instruction-like (highest s); ties go to the lower index."""
    order = sorted(range(len(similarities)), key=lambda l: (-similarities[l], l))
    positions = [0] * len(similarities)
    for p, layer in enumerate(order):
        positions[layer] = p
    return positions


def dropped_count(drop: float, num_layers: int) -> int:
    """D = round(drop * L), half up."""
    return int(math.floor(drop * num_layers + 0.5))


def layer_weights(
    similarities: Sequence[float],
    name: str,
    *,
    drop: float = 0.5,
    threshold: float = 0.95,
    normalize: str = "none",
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Weights of one expert's L layers from its similarities s_{l} to the instruction vector."""
    L = len(similarities)
    if name == "uniform":
        w = [1.0] * L
    elif name == "threshold":
        w = [0.0 if s > threshold else 1.0 for s in similarities]
    elif name in ("linear_rank", "log_rank"):
        D = dropped_count(drop, L)
        ramp = _linear if name == "linear_rank" else _log
        w = [0.0 if p < D else ramp(p, D, L) for p in rank_positions(similarities)]
    elif name == "explicit":
        if weights is None or len(weights) != L:
            got = "none" if weights is None else f"{len(weights)}"
            raise ValueError(f"weighting.weights must list one weight per layer: expected {L}, got {got}")
        w = [float(x) for x in weights]
    else:
        raise ValueError(f"unknown weighting '{name}'")
    if normalize == "mean":
        w = mean_normalized(w)
    elif normalize != "none":
        raise ValueError(f"unknown weighting.normalize '{normalize}'; choose none or mean")
    return w


def _linear(p: int, D: int, L: int) -> float:
    return (p - D + 1) / (L - D)


def _log(p: int, D: int, L: int) -> float:
    return math.log(1 + (p - D + 1)) / math.log(1 + (L - D))


def mean_normalized(w: Sequence[float]) -> list[float]:
    """Rescale so the mean over layers is 1."""
    mean = sum(w) / len(w)
    if mean == 0:
        raise ValueError("weighting.normalize=mean: every layer weight is 0, nothing to rescale")
    return [x / mean for x in w]
