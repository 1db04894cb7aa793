"""SCE, SLERP and NuSLERP (mergekit's): their statistics worked out by hand, whole merges against
the independent reference (tests/reference.py), mutation checks, the two-expert refusal, and the
same bits on every path of the engine. mergekit itself: benchmarks/mergekit_recipe.py."""

import math

import pytest
import torch

import reference
from conftest import assert_every_path_gives_the_same_bits, engine_configs, write_family
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.methods import METHODS
from lata.methods.nuslerp import nuslerp_coefficients
from lata.methods.sce import erased_mean, sce_weights, variance
from lata.methods.slerp import block_t, slerp_coefficients
from lata.registry import ConfigError


def delta(method, vectors, lams, weights=None, anchor=None, **params):
    names = [f"e{i}" for i in range(len(vectors))]
    return METHODS.build(method, params).delta(vectors, lams, names, "t", weights=weights, anchor=anchor)


def gram(*vectors):
    v = torch.stack([x.double().reshape(-1) for x in vectors])
    return (v @ v.T).unsqueeze(0)


# -- statistics by hand ---------------------------------------------------------------------------

U = [torch.tensor([1.0, 2.0, 0.0, -3.0]), torch.tensor([3.0, -2.0, 0.0, 1.0]), torch.tensor([2.0, 0.0, 0.0, 2.0])]


def test_sce_variance_weights_and_erasure_by_hand():
    # means [2, 0, 0, 0]; deviations^2 summed [2, 8, 0, 14] over 3 experts
    assert variance(U).tolist() == pytest.approx([2 / 3, 8 / 3, 0.0, 14 / 3])
    # sums of squares 14, 14, 8 over 4 positions: means 3.5, 3.5, 2 -> / 9
    assert sce_weights([14.0, 14.0, 8.0], 4) == pytest.approx([3.5 / 9, 3.5 / 9, 2 / 9])
    assert sce_weights([1e-6, 1e-6], 4) == [0.5, 0.5]  # mergekit's absolute floor: uniform below 1e-6
    # sums [6, 0, 0, 0] -> gamma [+, +, +, +] (0 counts as +): position 1 keeps u1's 2 only; position 3
    # keeps u2's 1 and u3's 2; zeros never agree (position 2: 0 / 1e-6 = 0)
    a = [0.5, 0.25, 0.25]
    got = erased_mean(U, a)
    assert got.tolist() == pytest.approx([(0.5 * 1 + 0.25 * 3 + 0.25 * 2) / 1.0, 2.0, 0.0, (0.25 + 0.5) / 0.5])
    # select_topk 0.5: 3 positions vary, int(1.5) = 1 kept (position 3); weights from the kept
    # values only: squares 9, 1, 4 over 4 positions
    w = sce_weights([9.0, 1.0, 4.0], 4)
    expected = (w[1] * 1 + w[2] * 2) / (w[1] + w[2])  # u1's -3 disagrees with the sum's sign (+)
    assert delta("sce", U, [1.0] * 3, select_topk=0.5).tolist() == pytest.approx([0, 0, 0, expected])
    # a common lambda scales the delta, leaves weights and signs
    assert delta("sce", U, [2.0] * 3).tolist() == pytest.approx((2 * delta("sce", U, [1.0] * 3)).tolist())


def test_slerp_by_hand():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    c1, c2 = slerp_coefficients(gram(x, y), 0.5)  # a quarter turn: halfway is 45 degrees
    assert (c1, c2) == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))
    c1, c2 = slerp_coefficients(gram(x, y), 1 / 3)  # sin(60) / sin(90), sin(30) / sin(90)
    assert (c1, c2) == pytest.approx((math.sqrt(3) / 2, 0.5))
    assert slerp_coefficients(gram(x, 2 * x + 1e-3 * y), 0.25) == (0.75, 0.25)  # nearly parallel: linear
    # theta = slerp(theta_0 + d_1, theta_0 + d_2): the anchor drops out
    anchor = torch.tensor([0.25, -0.5])
    got = delta("slerp", [x - anchor, y - anchor], [1.0, 1.0], anchor=anchor)
    assert (got + anchor).tolist() == pytest.approx([math.sqrt(0.5)] * 2)
    # the weighting's shares set t: (1 - t) a1 against t a2
    assert block_t(0.5, 1.0, 1.0) == 0.5 and block_t(0.3, 2.0, 2.0) == pytest.approx(0.3)
    assert block_t(0.5, 1.0, 3.0) == 0.75 and block_t(0.5, 0.0, 1.0) == 1.0 and block_t(0.5, 1.0, -1.0) == 0.5
    assert (delta("slerp", [x - anchor, y - anchor], [1.0, 1.0], weights=[1.0, 3.0], anchor=anchor) + anchor
            ).tolist() == pytest.approx([math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)])


def test_nuslerp_by_hand():
    a, b = torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    # flattened: a . b = 1... |a| = sqrt(6)? a = [2, 0, 1, 1], b = [0, 3, 1, 1]: cos = 2 / (sqrt(6) sqrt(11))
    g = math.acos(2 / math.sqrt(6 * 11))
    coef = nuslerp_coefficients(gram(a, b), 0.5)[0].tolist()
    assert coef == pytest.approx([math.sin(g / 2), math.sin(g / 2), math.sin(g)])
    # t = w_2 / (w_1 + w_2) from lambda_k w_k; per row: row 0 orthogonal, row 1 colinear (linear)
    got = delta("nuslerp", [a, b], [1.0, 3.0], nuslerp_flatten=False)
    q = math.pi / 2
    assert got[0].tolist() == pytest.approx([2 * math.sin(q / 4), 3 * math.sin(3 * q / 4)])
    assert got[1].tolist() == pytest.approx([1.0, 1.0])
    # per column: column 0 [2, 1] against [0, 1]; column 1 [0, 1] against [3, 1]
    cols = delta("nuslerp", [a, b], [1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    for c in range(2):
        x, y = a[:, c].double(), b[:, c].double()
        g = math.acos(float(x @ y / (x.norm() * y.norm())))
        expected = (math.sin(g / 2) * x + math.sin(g / 2) * y) / math.sin(g)
        assert cols[:, c].tolist() == pytest.approx(expected.tolist())
    assert delta("nuslerp", [a, b], [1.0, -1.0]).tolist() == delta("nuslerp", [a, b], [2.0, 2.0]).tolist()  # 0.5


def test_the_parameters_are_mergekits_and_two_experts_are_required(tmp_path):
    assert METHODS.parameters("sce") == {"select_topk": 1.0}
    assert METHODS.parameters("slerp") == {"t": 0.5}
    assert METHODS.parameters("nuslerp") == {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    assert [METHODS.get(m).mergekit for m in ("sce", "slerp", "nuslerp")] == ["sce", "slerp", "nuslerp"]
    for method, key, value in (("sce", "select_topk", 0.0), ("sce", "select_topk", 1.5), ("slerp", "t", 1.2)):
        with pytest.raises(ConfigError, match=f"merge.{key}={value} is out of range"):
            METHODS.build(method, {key: value})
    dirs = write_family(tmp_path, experts=("math", "code", "chat"))
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    for method in ("slerp", "nuslerp"):
        with pytest.raises(ConfigError, match=f"merge={method} merges exactly 2 experts; this family has 3 "
                                              r"\(math, code, chat\)"):
            plan_merge(family, MergeConfig(method=method), progress=False)


# -- whole merges against the reference -----------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("sce_slerp"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("sce3"), experts=("math", "code", "chat"))


def run_engine(dirs, **options):
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    return merge_state_dict(plan_merge(family, *engine_configs(options), progress=False))


def errors(got, expected):
    assert set(got) == set(expected)
    return {n: float((got[n].double() - expected[n].double()).norm() / expected[n].double().norm().clamp(min=1e-12))
            for n in expected}


LAMS = {"math": 0.6, "code": 1.4}
CASES = [dict(method=m, weighting=w, **extra)
         for m, extra in (("sce", {}), ("sce", dict(select_topk=0.3)), ("slerp", {}), ("slerp", dict(t=0.3)),
                          ("nuslerp", {}), ("nuslerp", dict(nuslerp_flatten=False)),
                          ("nuslerp", dict(nuslerp_flatten=False, nuslerp_row_wise=True)))
         for w in ("uniform", "linear_rank", "lines")] + [
    dict(method="sce", weighting="uniform", lams={"math": -0.5}, select_topk=0.5),
    dict(method="slerp", weighting="uniform", lams=LAMS, anchor="base"),
    dict(method="nuslerp", weighting="threshold", threshold=0.885, lams=LAMS),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_the_merge_is_the_references(dirs, options):
    assert max(errors(run_engine(dirs, **options), reference.merge(dirs, **options)).values()) < 1e-5


@pytest.mark.parametrize("options", [dict(method="sce", weighting="linear_rank", select_topk=0.2),
                                     dict(method="sce", weighting="uniform", lams={"chat": -1.0})])
def test_sce_with_three_experts_is_the_references(three, options):
    assert max(errors(run_engine(three, **options), reference.merge(three, **options)).values()) < 1e-5


BENT = [(dict(method="sce", weighting="uniform"), "no_erase"),
        (dict(method="sce", weighting="uniform", select_topk=0.3), "unmasked_weights"),
        (dict(method="slerp", weighting="uniform"), "lerp"),
        (dict(method="slerp", weighting="uniform", t=0.3), "swapped_t"),
        (dict(method="nuslerp", weighting="uniform"), "lerp"),
        (dict(method="nuslerp", weighting="linear_rank", lams=LAMS), "swapped_t")]


@pytest.mark.parametrize("options, bend", BENT, ids=[f"{o['method']}-{b}" for o, b in BENT])
def test_a_bent_formula_gives_another_merge(dirs, options, bend):
    got = run_engine(dirs, **options)
    assert max(errors(got, reference.merge(dirs, **options)).values()) < 1e-5
    assert max(errors(got, reference.merge(dirs, **options, bend=bend)).values()) > 1e-3


def test_a_sweep_over_lam_repeats_one_interpolation_and_a_dropped_expert_leaves_the_other(dirs):
    """One lambda for both experts leaves t where it is; where a weighting gives one expert 0 in a
    block, that block is the other expert's own weights (to float32 rounding)."""
    for method in ("slerp", "nuslerp"):
        assert all(torch.equal(a, b) for a, b in zip(run_engine(dirs, method=method).values(),
                                                      run_engine(dirs, method=method, lam=0.3).values()))
    math_expert = reference.load(dirs["experts"]["math"])
    got = run_engine(dirs, method="slerp", weighting="uniform", lams={"code": 0.0})
    assert all(torch.allclose(got[n], math_expert[n], rtol=0, atol=1e-6) for n in got)


# -- the same bits on every path --------------------------------------------------------------------

PATHS = [(MergeConfig(method="sce", select_topk=0.4, lams={"math": 0.7}), "linear_rank"),
         (MergeConfig(method="sce"), "uniform"),
         (MergeConfig(method="slerp", t=0.4), "linear_rank"),
         (MergeConfig(method="nuslerp", nuslerp_flatten=False), "log_rank"),
         (MergeConfig(method="nuslerp", nuslerp_flatten=False, nuslerp_row_wise=True), "uniform")]


@pytest.mark.parametrize("merge, weighting", PATHS, ids=[f"{m.method}-{w}" for m, w in PATHS])
def test_sliced_threaded_staged_and_whole_tensor_give_the_same_bits(wide_dirs, merge, weighting):
    family = Family.open(wide_dirs["base"], wide_dirs["instruct"], wide_dirs["experts"])
    plan = plan_merge(family, merge, WeightingConfig(name=weighting), progress=False)
    assert assert_every_path_gives_the_same_bits(plan) > 3


# -- mergekit recipes ---------------------------------------------------------------------------------

def test_the_recipes_carry_the_per_block_t_and_refuse_what_mergekit_cannot_merge(dirs):
    from lata.results.mergekit import mergekit_recipe

    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    lines = WeightingConfig(name="lines", alpha=0.2, beta=0.6)
    plan = plan_merge(family, MergeConfig(method="slerp", t=0.3, lams={"code": 0.5}), lines, progress=False)
    recipe = mergekit_recipe(plan)
    assert recipe["merge_method"] == "slerp" and recipe["base_model"] == str(dirs["experts"]["math"])
    assert [m["model"] for m in recipe["models"]] == [str(dirs["experts"][k]) for k in ("math", "code")]
    t = recipe["parameters"]["t"]
    math_w, code_w = plan.weights["math"], plan.weights["code"]
    assert t[-1]["value"] == pytest.approx([block_t(0.3, a, 0.5 * b) for a, b in zip(math_w, code_w)])
    assert {f["filter"]: f["value"] for f in t[:-1]} == {n: pytest.approx(block_t(0.3, 0.2, 0.1))
                                                          for n in family.tensor_names if family.layer_of(n) is None}
    plan = plan_merge(family, MergeConfig(method="nuslerp", nuslerp_flatten=False), lines, progress=False)
    recipe = mergekit_recipe(plan)
    assert recipe["parameters"] == {"nuslerp_flatten": False, "nuslerp_row_wise": False}
    assert recipe["base_model"] == str(dirs["instruct"])
    assert recipe["models"][1]["parameters"]["weight"][-1]["value"] == pytest.approx(code_w)
    uniform = WeightingConfig(name="uniform")
    recipe = mergekit_recipe(plan_merge(family, MergeConfig(method="sce", select_topk=0.4), uniform, progress=False))
    assert recipe["parameters"] == {"select_topk": 0.4} and all("parameters" not in m for m in recipe["models"])
    with pytest.raises(ConfigError, match="mergekit's sce takes no per-model weights.*expert 'math' has others"):
        mergekit_recipe(plan_merge(family, MergeConfig(method="sce", lam=0.5), uniform, progress=False))
    with pytest.raises(ConfigError, match=r"where every expert's lambda_k \* w_\(l,k\) is 0 \(block \d\) LATA keeps"):
        mergekit_recipe(plan_merge(family, MergeConfig(method="slerp"), WeightingConfig(name="linear_rank"),
                                   progress=False))
