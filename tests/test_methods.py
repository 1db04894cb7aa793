"""Merge methods on hand-built tensors, against results worked out by hand."""

import math

import numpy as np
import pytest
import torch

from lata.methods import METHODS, MergeMethod, disjoint_mean, summed
from lata.methods.dare import keep_mask
from lata.selection import (band_around, global_threshold, keep_count, kth_largest, kth_largest_in_band, kth_largest_magnitude,
                            sample_positions, scaled_magnitude)

V1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
V2 = torch.tensor([-2.0, 2.0, 1.0, 1.0])


def build_method(method, **params):
    """The checked method object, as ``merge.method`` and its keys give it."""
    return METHODS.build(method, params)


def task_arithmetic(vectors, lams):
    """sum_k lambda_k v_k by the ``ta`` method on whole tensors."""
    return build_method("ta").delta(vectors, lams, [f"e{i}" for i in range(len(vectors))], "t")


def test_task_arithmetic_with_forgetting():
    assert task_arithmetic([V1, V2], [1.0, 0.5]).tolist() == [2.0, 0.0, 1.0, -3.5]
    assert task_arithmetic([V1, V2], [-1.0, 1.0]).tolist() == [-5.0, 3.0, 0.5, 5.0]


def test_keep_count_is_ceil_without_float_artefacts():
    assert keep_count(10, 0.2) == 2
    assert keep_count(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floats
    assert keep_count(10, 0.25) == 3
    assert keep_count(3, 0.01) == 1
    assert keep_count(0, 0.5) == 0


def test_ties_by_hand():
    # density 0.5 -> k = 2: V1 keeps 3 and -4; V2 keeps -2 and 2 (|2| ties)
    # u1 = [3,0,0,-4], u2 = [-2,2,0,0]; gamma = sign([1,2,0,-4]) = [+,+,0,-]
    merged = build_method("ties", density=0.5).delta([V1, V2], [1.0, 1.0], ["a", "b"], "t")
    assert merged.tolist() == [3.0, 2.0, 0.0, -4.0]


def test_ties_disjoint_mean_averages_agreeing_values_only():
    u = [torch.tensor([2.0, -1.0, 0.0]), torch.tensor([4.0, 3.0, 0.0]), torch.tensor([-1.0, 5.0, 0.0])]
    # col0: sum 5 (+) -> mean(2, 4) = 3; col1: sum 7 (+) -> mean(3, 5) = 4; col2: none -> 0
    assert disjoint_mean(u).tolist() == [3.0, 4.0, 0.0]


def test_ties_keeps_values_tied_with_the_kth():
    v = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert kth_largest_magnitude(v, keep_count(v.numel(), 0.25)) == 1.0  # k = 1, but all three |1| are kept
    assert build_method("ties", density=0.25).delta([v], [1.0], ["a"], "t").tolist() == [1.0, -1.0, 1.0, 0.0]


def test_ties_negative_lambda_flips_before_election():
    merged = build_method("ties", density=1.0).delta([V1, V2], [-1.0, 1.0], ["a", "b"], "t")
    # u1 = -V1 = [-3, 1, -.5, 4], u2 = [-2, 2, 1, 1]; gamma = [-, +, +, +]
    assert merged.tolist() == pytest.approx([-2.5, 1.5, 1.0, 2.5])


@pytest.mark.parametrize("w", [0.7368421052631579, -0.3, 1e-30, 3.0, 1.0, 2.0 ** -130])
def test_weighted_kth_magnitude_is_the_scaled_kth_magnitude(w):
    # runs of adjacent float32 values (several round to one product), subnormals, zeros, ties
    g = torch.Generator().manual_seed(3)
    start = torch.randn(40, generator=g).abs().add_(1e-3)
    runs = [start[i] * (1 + torch.arange(25) * 2.0 ** -23) for i in range(40)]
    d = torch.cat(runs + [torch.randn(200, generator=g) * 1e-40, torch.zeros(30), torch.full((7,), 0.5)])
    d = torch.where(torch.arange(d.numel()) % 2 == 0, d, -d)  # both signs
    weighted = (d * w).abs()  # the engine's pure vector: a float32 product, as pure_slice computes it
    for k in range(1, d.numel() + 1, 7):
        assert scaled_magnitude(kth_largest(d.abs(), k), w) == kth_largest(weighted, k), k


def _by_band(values, band, k):
    """kth_largest_in_band after the kernel's counting pass, done in numpy (NaN counted above)."""
    if band is None:
        return None
    lo, hi = band
    above = int(((values > hi) | np.isnan(values)).sum())
    return kth_largest_in_band(k, above, values[(values >= lo) & (values <= hi)].copy())


@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_by_band_is_the_exact_kth_largest(seed):
    rng = np.random.default_rng(seed)
    n = 200_000
    values = np.abs(rng.standard_normal(n).astype(np.float32)) * 1e-3
    values[: n // 5] = np.round(values[: n // 5], 4)  # long runs of equal values
    values[n // 5: n // 4] = 0.0
    values[-3:] = [np.inf, np.nan, 5.0]
    rng.shuffle(values)
    positions = sample_positions(n)
    assert np.array_equal(positions, sample_positions(n)) and positions.size == min(n, 1 << 14)
    for k in [1, 2, 3, 4, 17, 20_000, 40_000, 100_000, 149_000, 150_001, n - 1, n]:
        expected = float(np.partition(values, n - k)[n - k])
        band = band_around(values[positions], n, k)
        got = _by_band(values, band, k)
        if k == 1:  # the NaN (largest, as numpy orders it) lies above any band: no answer, not a wrong one
            assert got is None
        else:
            assert got == expected, k
    assert band_around(np.array([1.0, np.nan], np.float32), n, 5) is None


def test_a_misplaced_band_gives_no_answer_rather_than_a_wrong_one():
    values = np.arange(1000, dtype=np.float32)
    assert _by_band(values, (10.0, 20.0), 5) is None  # the 5th largest, 995, lies above
    assert _by_band(values, (990.0, 998.0), 1) is None  # 999 lies above the band
    assert _by_band(values, (990.0, 998.0), 5) == 995.0
    assert _by_band(values, (0.0, math.inf), 1000) == 0.0


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 1.0])
def test_global_threshold_is_exact(density):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(50, 7, generator=g), torch.randn(300, generator=g).round(decimals=1),
               torch.zeros(20), torch.randn(3, 3, 3, generator=g) * 1e-3]
    flat = torch.cat([t.flatten() for t in tensors]).abs()
    k = math.ceil(density * flat.numel())
    expected = torch.sort(flat, descending=True).values[k - 1].item()
    assert global_threshold(lambda: iter(tensors), density) == expected


def test_dare_mask_drop_fraction_rescale_and_reproducibility():
    p = 0.3
    v = torch.ones(200_000)
    u = build_method("dare", p=p, seed=7).delta([v], [2.0], ["math"], "w")
    kept = u != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 4.7 sigma is ~0.005
    assert torch.allclose(u[kept], torch.full_like(u[kept], 2.0 / (1 - p)))
    again = build_method("dare", p=p, seed=7).delta([v], [2.0], ["math"], "w")
    assert torch.equal(u, again)
    other_tensor = build_method("dare", p=p, seed=7).delta([v], [2.0], ["math"], "w2")
    other_seed = build_method("dare", p=p, seed=8).delta([v], [2.0], ["math"], "w")
    assert not torch.equal(u, other_tensor) and not torch.equal(u, other_seed)


def test_dare_p_zero_is_task_arithmetic():
    assert build_method("dare", p=0.0).delta([V1, V2], [1.0, 0.5], ["a", "b"], "t").tolist() == \
        task_arithmetic([V1, V2], [1.0, 0.5]).tolist()


def test_dare_ties_elects_signs_of_dropped_and_rescaled_vectors():
    p, seed = 0.5, 3
    v1, v2 = torch.randn(1000), torch.randn(1000)
    m1, m2 = keep_mask(v1.shape, p, seed, "a", "t"), keep_mask(v2.shape, p, seed, "b", "t")
    u1, u2 = 1.5 * m1 * v1 / (1 - p), -0.5 * m2 * v2 / (1 - p)
    expected = torch.zeros(1000)
    for i in range(1000):
        gamma = math.copysign(1, u1[i] + u2[i]) if (u1[i] + u2[i]) != 0 else 0
        agree = [u[i] for u in (u1, u2) if u[i] != 0 and math.copysign(1, u[i]) == gamma]
        expected[i] = sum(agree) / len(agree) if agree else 0.0
    got = build_method("dare_ties", p=p, seed=seed).delta([v1, v2], [1.5, -0.5], ["a", "b"], "t")
    assert torch.allclose(got, expected, atol=1e-6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="merge.method='foo' is not allowed; choose one of: breadcrumbs, "):
        build_method("foo")


def test_breadcrumbs_by_hand():
    # n = 10, density 0.5 -> 5 kept; gamma 0.1 -> the 1 largest dropped: keep ranks 2..6 from the top
    v = torch.arange(1.0, 11.0) * torch.tensor([1.0, -1.0] * 5)
    got = build_method("breadcrumbs", density=0.5, gamma=0.1).delta([v], [2.0], ["a"], "t")
    assert got.tolist() == [0, 0, 0, 0, 10, -12, 14, -16, 18, 0]  # 2 * [5, -6, 7, -8, 9]
    # gamma 0.6 would leave fewer than 5: the outlier cut shrinks to n - kept = 5 (keep the 5 smallest)
    got = build_method("breadcrumbs", density=0.5, gamma=0.6).delta([v], [1.0], ["a"], "t")
    assert got.tolist() == [1, -2, 3, -4, 5, 0, 0, 0, 0, 0]
    # density 1, gamma 0: plain task arithmetic
    assert torch.equal(build_method("breadcrumbs", density=1.0, gamma=0.0).delta([V1, V2], [1.0, 0.5], ["a", "b"], "t"),
                       task_arithmetic([V1, V2], [1.0, 0.5]))
    # values tied with a boundary are all kept (as TIES keeps ties)
    tied = torch.tensor([4.0, 3.0, 3.0, 1.0])
    assert build_method("breadcrumbs", density=0.25, gamma=0.25).delta([tied], [1.0], ["a"], "t").tolist() == \
        [0, 3, 3, 0]


def test_breadcrumbs_ties_elects_signs_on_the_kept_values():
    # density 0.75 (3 of 4), gamma 0.25 (1 outlier)
    v1, v2 = torch.tensor([3.0, -1.0, 0.5, -4.0]), torch.tensor([-2.0, 2.0, 1.0, 1.0])
    # V1 by |v|: 4, 3, 1, 0.5 -> drop 4, keep 3, 1, 0.5; V2: 2, 2, 1, 1 -> drop rank 1 (|2|): the band
    # [1, 2] holds every value, all kept (ties at the top boundary)
    got = build_method("breadcrumbs_ties", density=0.75, gamma=0.25).delta([v1, v2], [1.0, 1.0], ["a", "b"], "t")
    # u1 = [3,-1,0.5,0], u2 = [-2,2,1,1]; gamma = sign([1,1,1.5,1]) = +; agreeing means: 3, 2, 0.75, 1
    assert got.tolist() == [3.0, 2.0, 0.75, 1.0]


def test_della_keeps_by_magnitude_rank_and_is_unbiased():
    from lata.methods.della import keep_probabilities

    m = torch.tensor([0.5, 3.0, 1.0, 2.0, 2.0])  # ranks 0, 4, 1, 2 (earlier of the equal pair), 3
    p = keep_probabilities(m, 0.5, 0.2)
    assert p.tolist() == pytest.approx([0.3, 0.7, 0.4, 0.5, 0.6])
    n = 200_000
    v = torch.randn(n)
    method = build_method("della_linear", density=0.5, epsilon=0.3, seed=4)
    got = method.delta([v], [1.0], ["a"], "t")
    kept = got != 0
    order = torch.argsort(v.abs())
    low, high = kept[order[: n // 10]].float().mean(), kept[order[-n // 10:]].float().mean()
    assert abs(low - 0.23) < 0.01 and abs(high - 0.77) < 0.01  # mean p over the bottom / top decile
    assert torch.allclose(got[kept], v[kept] / keep_probabilities(v.abs(), 0.5, 0.3)[kept], rtol=1e-6)  # 1/p
    assert abs(float(got.sum() - v.sum())) < 5 * math.sqrt(n)  # E[kept / p] = v
    assert torch.equal(got, method.delta([v], [1.0], ["a"], "t"))  # seeded
    assert not torch.equal(got, method.delta([v], [1.0], ["b"], "t"))  # per expert


def test_della_elects_signs_like_ties():
    v1, v2 = torch.tensor([3.0, -1.0, 0.5, -4.0]), torch.tensor([-2.0, 2.0, 1.0, 1.0])
    scales = []
    for name, v in (("a", v1), ("b", v2)):
        scales.append(build_method("della_linear", density=0.5, epsilon=0.4, seed=1).delta([v], [1.0], [name], "t"))
    got = build_method("della", density=0.5, epsilon=0.4, seed=1).delta([v1, v2], [1.0, 0.5], ["a", "b"], "t")
    assert torch.equal(got, disjoint_mean([scales[0], scales[1] * 0.5]))


def test_contributions_scale_by_lambda_once_and_skip_exactly_one():
    a, b = V1.clone(), V2.clone()
    us = MergeMethod().contributions([a, b], [1.0, 0.5], None, 0, 4)
    assert us[0] is a and us[0].tolist() == V1.tolist()  # lambda 1.0: no multiply
    assert us[1] is b and us[1].tolist() == [-1.0, 1.0, 0.5, 0.5]  # in place in the kept values
    assert summed(us).tolist() == [2.0, 0.0, 1.0, -3.5]


@pytest.mark.parametrize("base, variant", [("dare", "dare_ties"), ("breadcrumbs", "breadcrumbs_ties"),
                                           ("della_linear", "della")])
def test_ties_variants_are_the_base_sparsifier_with_the_ties_consensus(base, variant):
    B, V = METHODS.get(base), METHODS.get(variant)
    assert issubclass(V, B) and V.name == variant and V.consensus is disjoint_mean
    assert V.__name__ == {"dare_ties": "DareTies", "breadcrumbs_ties": "BreadcrumbsTies", "della": "Della"}[variant]
    assert METHODS.parameters(variant) == METHODS.parameters(base)
    assert (V.mergekit, V.mergekit_normalize, B.mergekit_normalize, V.fused) == (variant, True, False, False)
    params = {"dare": {"p": 0.4, "seed": 2}, "breadcrumbs": {"density": 0.6, "gamma": 0.1},
              "della_linear": {"density": 0.5, "epsilon": 0.3, "seed": 2}}[base]
    g = torch.Generator().manual_seed(5)
    vs, lams, names = [torch.randn(500, generator=g) for _ in range(3)], [1.0, 0.6, -0.8], ["a", "b", "c"]
    # each expert alone through the base method is its contribution u_k = lambda_k * kept(v_k)
    us = [build_method(base, **params).delta([v], [lam], [k], "t") for v, lam, k in zip(vs, lams, names)]
    assert all(int((u != 0).sum()) < 450 for u in us)  # values were dropped
    assert torch.equal(build_method(variant, **params).delta(vs, lams, names, "t"), disjoint_mean(us))
    assert torch.equal(build_method(base, **params).delta(vs, lams, names, "t"), us[0] + us[1] + us[2])


def test_dare_folds_lambda_into_its_rescale_and_sums_from_zero():
    v = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(1000) % 3 != 0
    dare = build_method("dare", p=0.3)
    kept = dare.kept(v.clone(), mask, 0, 1000)
    assert torch.equal(kept, torch.where(mask, v * (1 / 0.7), torch.zeros(())))
    u = dare.contributions([v.clone()], [0.3], [mask], 0, 1000)[0]
    assert torch.equal(u, torch.where(mask, v * (0.3 / 0.7), torch.zeros(())))  # one multiply, one rounding
    assert not torch.equal(u, kept * 0.3)  # rescale, then lambda: two roundings, other values
    # the sum starts from +0.0: a -0.0 contribution gives +0.0 where task arithmetic keeps the -0.0
    zero = torch.tensor([-0.0])
    assert not torch.signbit(build_method("dare", p=0.0).delta([zero], [1.0], ["a"], "t")).item()
    assert torch.signbit(build_method("ta").delta([zero], [1.0], ["a"], "t")).item()
