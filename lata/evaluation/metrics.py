"""Metric functions on plain values: answer extraction, exact match, pass@k, Wilson intervals.

Perplexity needs the model: ``lata.evaluation.harness.strided_perplexity``."""

from __future__ import annotations

import math
import re

_STRICT = re.compile(r"#### *(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5'; '7.0' -> '7'; strips '$' and trailing '.'."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def strict_answer(response: str) -> str | None:
    """The number after the first '#### ' (GSM8K's answer format), or None."""
    match = _STRICT.search(response)
    return normalize_number(match.group(1)) if match else None


def flexible_answer(response: str) -> str | None:
    """The last number anywhere in the response, or None."""
    numbers = _NUMBER.findall(response)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(prediction: str | None, target: str | int | float) -> float:
    return float(prediction is not None and prediction == normalize_number(str(target)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval (as fractions) of a proportion ``successes / n``."""
    if n <= 0:
        raise ValueError("an interval of an empty sample")
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n)))
