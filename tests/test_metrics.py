"""Metrics against known answers."""

from itertools import combinations

import pytest

from lata.evaluation.metrics import exact_match, flexible_answer, normalize_number, pass_at_k, strict_answer, wilson_interval


@pytest.mark.parametrize("response, strict, flexible", [
    ("3 + 4 = 7\n#### 7", "7", "7"),
    ("Natalia sold 48/2 = 24 clips.\n#### 1,072", "1072", "1072"),
    ("#### -5.0 apples", "-5", "-5"),
    ("The answer is $12.50.", None, "12.5"),
    ("no numbers here", None, None),
    ("#### 8\nthen later 9", "8", "9"),
])
def test_answer_extraction(response, strict, flexible):
    assert strict_answer(response) == strict
    assert flexible_answer(response) == flexible


def test_exact_match_normalizes_targets():
    assert exact_match("1072", "1,072") == 1.0
    assert exact_match("7", 7) == 1.0 and exact_match("7", 8) == 0.0 and exact_match(None, 7) == 0.0
    assert normalize_number("7.0") == "7" and normalize_number("0.50") == "0.5"


def brute_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (c correct) containing a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(10, 3, 1), (10, 3, 5), (10, 0, 3), (10, 10, 1), (7, 2, 6), (5, 4, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))


def test_pass_at_1_is_the_pass_rate_and_bad_arguments_fail():
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2))  # z² / (n + z²)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
