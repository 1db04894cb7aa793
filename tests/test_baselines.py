"""The data-free baselines (Model Soup, Consensus TA, Localize-and-Stitch): their statistics worked
out by hand, whole merges against the independent reference (tests/reference.py), mutation checks
that a bent formula gives another merge, and the same bits on every path of the engine."""

import shutil

import pytest
import torch

import reference
from conftest import assert_every_path_gives_the_same_bits, engine_configs, write_family
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.methods import METHODS
from lata.methods.consensus import agreement_counts, consensus_sum
from lata.methods.localize_stitch import stitched
from lata.registry import ConfigError

V1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
V2 = torch.tensor([-2.0, 2.0, 1.0, 1.0])
EXPERTS = ("math", "code", "chat")


def delta(method, vectors, lams, **params):
    """The method's delta on whole tensors (``MergeMethod.delta``)."""
    return METHODS.build(method, params).delta(vectors, lams, [f"e{i}" for i in range(len(vectors))], "t")


# -- statistics by hand ---------------------------------------------------------------------------

def test_soup_is_the_lambda_weighted_average():
    assert delta("soup", [V1, V2], [1.0, 1.0]).tolist() == [0.5, 0.5, 0.75, -1.5]
    # (V1 + 3 V2) / 4
    assert delta("soup", [V1, V2], [1.0, 3.0]).tolist() == [-0.75, 1.25, 0.875, -0.25]
    assert delta("soup", [V1], [0.4]).tolist() == V1.tolist()  # one expert: its own vector, whatever lambda
    with pytest.raises(ConfigError, match="merge=soup divides by the sum of the lambdas, which is 0 for tensor 't'"):
        delta("soup", [V1, V2], [1.0, -1.0])


# u1, u2, u3 and tau_MTL = [1, 1, 5, -1]; with tall_lambda = 0.5 the right-hand sides are
# u1: [0, 0.5, 2.5, 1]; u2: [0, 1.5, 2.5, 1]; u3: [1, 0, 0, 1] (three of them equal to |u_k|)
U = [torch.tensor([1.0, 2.0, 0.0, -3.0]), torch.tensor([1.0, -2.0, 0.0, 1.0]), torch.tensor([-1.0, 1.0, 5.0, 1.0])]


def test_consensus_masks_and_agreement_counts_by_hand():
    total, count = agreement_counts(U, 0.5)
    assert total.tolist() == [1.0, 1.0, 5.0, -1.0]
    # masks: u1 [T, T, F, T], u2 [T, T, F, T (tie)], u3 [T (tie), T, T, T (tie)]
    assert count.tolist() == [3, 3, 1, 3]
    strict = sum((u.abs() > 0.5 * (total - u).abs()).int() for u in U)  # the paper's >= bent to >
    assert strict.tolist() == [2, 3, 1, 1]
    assert consensus_sum(U, 0.5, 2).tolist() == [1.0, 1.0, 0.0, -1.0]
    assert consensus_sum(U, 0.5, 1).tolist() == [1.0, 1.0, 5.0, -1.0]
    assert consensus_sum(U, 0.5, 4).tolist() == [0.0, 0.0, 0.0, 0.0]
    # tall_lambda 0: every mask holds (|u| >= 0), so k = 3 keeps every position
    assert agreement_counts(U, 0.0)[1].tolist() == [3, 3, 3, 3]


def test_consensus_lambda_scales_the_vectors_before_masks_and_sum():
    assert delta("consensus", U, [1.0, 1.0, 1.0], tall_lambda=0.5).tolist() == [1.0, 1.0, 0.0, -1.0]
    # a common lambda leaves the masks as they are and scales tau_MTL: the paper's lambda
    assert delta("consensus", U, [2.0, 2.0, 2.0], tall_lambda=0.5).tolist() == [2.0, 2.0, 0.0, -2.0]
    # per-expert lambdas scale each tau_k first: u3 * 0.5 = [-0.5, 0.5, 2.5, 0.5], tau_MTL = [1.5, 0.5, 2.5, -1.5]
    # masks u1 [T, T, F, T], u2 [T, T, F, F], u3 [F, T, T, F]: counts [2, 3, 1, 1]
    assert delta("consensus", U, [1.0, 1.0, 0.5], tall_lambda=0.5).tolist() == [1.5, 0.5, 0.0, 0.0]
    # two experts, k = 2 by default: kept where both masks hold
    assert delta("consensus", [V1, V2], [1.0, 1.0]).tolist() == [1.0, 1.0, 1.5, -3.0]
    assert delta("consensus", [V1], [1.0]).tolist() == [0.0] * 4  # one expert never reaches k = 2


def test_localize_stitch_keeps_the_top_density_and_averages_overlaps():
    a, b, c = torch.tensor([4.0, -3.0, 1.0, 0.5]), torch.tensor([-2.0, 0.1, 3.0, 0.2]), torch.tensor([6.0, 0, 0, 9.0])
    # density 0.5: 2 of 4 kept. a keeps 4, -3; b keeps -2, 3; they overlap at position 0
    assert delta("localize_stitch", [a, b], [1.0, 1.0], density=0.5).tolist() == [1.0, -3.0, 3.0, 0.0]
    # lambda scales each expert's stitched values: u = [4, -3, 0, 0], [-4, 0, 6, 0]
    assert delta("localize_stitch", [a, b], [1.0, 2.0], density=0.5).tolist() == [0.0, -3.0, 6.0, 0.0]
    # c keeps 6 and 9: position 0 is held by three experts, position 3 by one
    got = delta("localize_stitch", [a, b, c], [1.0, 1.0, 1.0], density=0.5)
    assert got.tolist() == pytest.approx([8.0 / 3.0, -3.0, 3.0, 9.0])
    # values tied with the threshold are all kept (k = 1 here, three |1| kept)
    tied = torch.tensor([1.0, -1.0, 1.0, 0.5])
    assert delta("localize_stitch", [tied], [1.0], density=0.25).tolist() == [1.0, -1.0, 1.0, 0.0]
    # the overlap count is the number of non-zero contributions at each position
    us = [torch.tensor([2.0, 0.0, -1.0, 0.0]), torch.tensor([4.0, 5.0, 0.0, 0.0]), torch.tensor([-3.0, 1.0, 0.0, 0.0])]
    assert stitched(us).tolist() == [1.0, 3.0, -1.0, 0.0]  # [3/3, 6/2, -1/1, 0]


def test_the_yaml_defaults_are_the_papers():
    assert METHODS.parameters("soup") == {}
    assert METHODS.parameters("consensus") == {"k": 2, "tall_lambda": 0.2}
    assert METHODS.parameters("localize_stitch") == {"density": 0.1}
    # Consensus TA and Localize-and-Stitch are not in mergekit 0.1.5; soup and model_stock are
    # (exported where the layer weights allow: tests/test_mergekit.py)
    assert [METHODS.get(m).mergekit for m in ("soup", "consensus", "localize_stitch", "model_stock")] == [
        "linear", None, None, "model_stock"]
    with pytest.raises(ConfigError, match="export=mergekit: merge=consensus has no mergekit counterpart"):
        METHODS.build("consensus", {}).check_exportable()
    for key, value in (("k", 0), ("k", 1.5), ("tall_lambda", -0.1)):
        with pytest.raises(ConfigError, match=f"merge.{key}="):
            METHODS.build("consensus", {key: value})
    with pytest.raises(ConfigError, match="merge.density=0.0 is out of range"):
        METHODS.build("localize_stitch", {"density": 0.0})


# -- whole merges against the reference -----------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("baselines"), experts=EXPERTS)


def run_engine(dirs, **options):
    family = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    return merge_state_dict(plan_merge(family, *engine_configs(options), progress=False))


def relative_errors(got, expected):
    assert set(got) == set(expected)
    errors = {}
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        g, e = got[name].double(), expected[name].double()
        errors[name] = float((g - e).norm() / e.norm().clamp(min=1e-12))
    return errors


def assert_close(got, expected):
    errors = relative_errors(got, expected)
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda x: x[1])


LAMS = {"math": 0.5, "code": 1.5, "chat": -0.4}
CASES = [dict(method=m, weighting=w, **extra)
         for m, extra in (("soup", {}), ("consensus", {}), ("consensus", dict(k=3, tall_lambda=0.4)),
                          ("consensus", dict(k=1, tall_lambda=1.0)), ("localize_stitch", dict(density=0.3)),
                          ("localize_stitch", dict(density=0.1)))
         for w in ("uniform", "linear_rank")] + [
    dict(method="soup", weighting="uniform", lams=LAMS),
    dict(method="soup", weighting="linear_rank", lam=0.7, lams={"chat": 2.0}),
    dict(method="soup", weighting="threshold", threshold=0.8, anchor="base"),
    dict(method="consensus", weighting="uniform", lams=LAMS, tall_lambda=0.3),
    dict(method="consensus", weighting="log_rank", lam=0.4),
    dict(method="localize_stitch", weighting="uniform", lams=LAMS, density=0.5),
    dict(method="localize_stitch", weighting="lines", density=0.2, alpha=0.2, beta=0.6, lams={"math": 0.0}),
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_the_merge_is_the_references(dirs, options):
    assert_close(run_engine(dirs, **options), reference.merge(dirs, **options))


def test_uniform_soup_is_the_mean_of_the_experts(dirs):
    """mergekit's ``linear`` with every weight 1: mean_k theta_k, up to float rounding."""
    got = run_engine(dirs, method="soup")
    experts = [reference.load(p) for p in dirs["experts"].values()]
    for name, value in got.items():
        mean = sum(e[name].double() for e in experts) / len(experts)
        assert torch.allclose(value.double(), mean, rtol=0, atol=1e-6), name
        assert not torch.equal(value, reference.load(dirs["instruct"])[name])


# -- mutation checks: each bent formula gives another merge --------------------------------------

@pytest.fixture(scope="module")
def with_unchanged_expert(tmp_path_factory):
    """math, code and an expert identical to instruct (its pure vector is 0 everywhere)."""
    d = write_family(tmp_path_factory.mktemp("unchanged"), experts=("math", "code", "same"))
    for file in d["instruct"].glob("*.safetensors"):
        shutil.copy(file, d["experts"]["same"] / file.name)
    return d


BENT = [  # (options, bend): the options under which the bend shows
    # threshold 0.885 zeroes block 1 of chat only (similarities 0.888 against 0.884 and 0.875)
    (dict(method="soup", weighting="threshold", threshold=0.885), "all_lambdas"),
    (dict(method="soup", weighting="uniform", lams=LAMS), "expert_count"),
    (dict(method="soup", weighting="uniform"), "no_division"),
    (dict(method="consensus", weighting="uniform"), "k_minus_one"),
    (dict(method="consensus", weighting="uniform", lams=LAMS), "unscaled_masks"),
    (dict(method="localize_stitch", weighting="uniform", density=0.3), "no_overlap_division"),
    (dict(method="localize_stitch", weighting="linear_rank", density=0.3), "floor_count"),
]


@pytest.mark.parametrize("options, bend", BENT, ids=[b for _, b in BENT])
def test_a_bent_formula_gives_another_merge(dirs, options, bend):
    got = run_engine(dirs, **options)
    assert_close(got, reference.merge(dirs, **options))
    assert max(relative_errors(got, reference.merge(dirs, **options, bend=bend)).values()) > 1e-3


def test_the_consensus_mask_holds_on_equality(with_unchanged_expert):
    """tall_lambda 0: |u| >= 0 holds everywhere (k = 3 keeps all), |u| > 0 fails for the unchanged
    expert (k = 3 would keep nothing)."""
    options = dict(method="consensus", weighting="uniform", k=3, tall_lambda=0.0)
    got = run_engine(with_unchanged_expert, **options)
    assert_close(got, reference.merge(with_unchanged_expert, **options))
    assert_close(got, reference.merge(with_unchanged_expert, method="ta"))  # all of tau_MTL kept
    assert max(relative_errors(got, reference.merge(with_unchanged_expert, **options, bend="strict_mask")).values()) > 1e-3
    with pytest.raises(ValueError, match="no bend 'strict_mask' for merge method 'soup'"):
        reference.merge(with_unchanged_expert, method="soup", bend="strict_mask")


def test_an_unchanged_expert_does_not_dilute_the_stitch(with_unchanged_expert):
    """Its kept values are 0: it holds no position, so the others' overlaps are averaged as
    without it (the reference counts the non-zero kept values of each expert)."""
    options = dict(method="localize_stitch", weighting="uniform", density=0.3)
    got = run_engine(with_unchanged_expert, **options)
    without = {k: v for k, v in with_unchanged_expert["experts"].items() if k != "same"}
    assert_close(got, reference.merge({**with_unchanged_expert, "experts": without}, **options))


# -- the same bits on every path --------------------------------------------------------------------

PATHS = [(MergeConfig(method="soup", lams={"math": 0.7, "code": 1.3}), "linear_rank"),
         (MergeConfig(method="soup"), "uniform"),
         (MergeConfig(method="consensus", lams={"math": 0.6, "code": -1.2}, tall_lambda=0.3), "linear_rank"),
         (MergeConfig(method="consensus", k=1), "uniform"),
         (MergeConfig(method="localize_stitch", density=0.3, lams={"code": 0.5}), "linear_rank"),
         (MergeConfig(method="localize_stitch"), "uniform")]


@pytest.mark.parametrize("merge, weighting", PATHS, ids=[f"{m.method}-{w}" for m, w in PATHS])
def test_sliced_threaded_staged_and_whole_tensor_give_the_same_bits(wide_dirs, merge, weighting):
    family = Family.open(wide_dirs["base"], wide_dirs["instruct"], wide_dirs["experts"])
    plan = plan_merge(family, merge, WeightingConfig(name=weighting), progress=False)
    assert assert_every_path_gives_the_same_bits(plan) > 3
