"""The streaming engine against the independent whole-model reference (tests/reference.py)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import reference
from conftest import data_free_methods, engine_configs, similarity_weightings, write_family
import lata.plan as planning
from lata import (Family, MergeConfig, WeightingConfig, engine, merge_into_model, merge_state_dict, merge_to_dir,
                  plan_merge)
from lata.accel import kernels
from lata.accel.compute import pure_slice


EXPLICIT = [0.0, 0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def family(family_dirs):
    return Family.open(family_dirs["base"], family_dirs["instruct"], family_dirs["experts"])


def assert_state_close(got: dict, expected: dict, rtol=1e-5):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        g, e = got[name].double(), expected[name].double()
        err = (g - e).norm() / e.norm().clamp(min=1e-12)
        assert err < rtol, f"{name}: relative error {err:.2e}"


def run_engine(family, **options):
    return merge_state_dict(plan_merge(family, *engine_configs(options), progress=False))


def test_similarities_match_concatenated_layer_vectors(family, family_dirs):
    plan = plan_merge(family, MergeConfig(), WeightingConfig(), progress=False)
    base, instruct = reference.load(family_dirs["base"]), reference.load(family_dirs["instruct"])
    for name, path in family_dirs["experts"].items():
        expected = reference.similarities(base, instruct, reference.load(path), 4)
        assert plan.analysis.similarities[name] == pytest.approx(expected, abs=1e-6)
    # the fixture makes early layers share the instruction direction: similarity falls with depth
    sims = plan.analysis.similarities["math"]
    assert sims[0] > sims[3]


@pytest.mark.parametrize("weighting", similarity_weightings())
@pytest.mark.parametrize("method", data_free_methods())
def test_every_method_with_every_weighting(family, family_dirs, method, weighting):
    """Every registered method x weighting against the independent reference."""
    options = dict(method=method, weighting=weighting, density=0.3, p=0.4, seed=5, threshold=0.8, explicit=EXPLICIT,
                   gamma=0.05, epsilon=0.1, alpha=0.3, beta=0.9)
    assert_state_close(run_engine(family, **options), reference.merge(family_dirs, **options))


@pytest.mark.parametrize("options", [
    dict(method="ta", weighting="linear_rank", normalize="mean"),
    dict(method="ties", weighting="log_rank", normalize="mean", density=0.5),
    dict(method="ta", weighting="log_rank", rest_weight=0.5),
    dict(method="ties", weighting="linear_rank", rest_weight=0.0, density=0.2),
    dict(method="ta", weighting="linear_rank", anchor="base"),
    dict(method="dare_ties", weighting="threshold", anchor="base", threshold=0.9, p=0.3),
    dict(method="ties", weighting="linear_rank", topk_scope="global", density=0.1),
    dict(method="ties", weighting="uniform", topk_scope="global", density=0.5, lam=0.7),
    dict(method="ta", weighting="threshold", threshold=0.9, lams={"math": -1.0}),
    dict(method="ties", weighting="log_rank", lam=0.6, lams={"code": -0.8}, density=0.4),
    dict(method="dare", weighting="linear_rank", lams={"math": -1.0, "code": 0.3}, p=0.2, drop=0.25),
    dict(method="breadcrumbs", weighting="uniform", density=0.5, gamma=0.2, lam=0.7),
    dict(method="breadcrumbs_ties", weighting="log_rank", density=0.9, gamma=0.0, lams={"math": -0.5}),
    dict(method="breadcrumbs", weighting="uniform", density=0.95, gamma=0.3),  # gamma cut to keep the density
    dict(method="della", weighting="lines", density=0.6, epsilon=0.3, seed=2, alpha=0.0, beta=1.0),
    dict(method="della_linear", weighting="threshold", threshold=0.9, density=0.5, epsilon=0.0, anchor="base"),
    dict(method="ta", weighting="lines", alpha=0.2, beta=0.6, rest_weight=1.0),
    dict(method="ties", weighting="lines", normalize="mean", density=0.4),
])
def test_options(family, family_dirs, options):
    assert_state_close(run_engine(family, **options), reference.merge(family_dirs, **options))


@pytest.mark.parametrize("path", ["torch", "fused", "band", "band-missed"])
def test_ties_selects_once_per_family_and_tensor_and_matches_selecting_the_weighted_vectors(
        family_dirs, monkeypatch, path):
    fused = path != "torch"
    if fused:
        pytest.importorskip("numba")
        monkeypatch.setattr(kernels, "MIN_BYTES", 0)
    if path.startswith("band"):  # every tensor selects by band; "band-missed": every band misplaced
        monkeypatch.setattr(engine, "BAND_MIN_VALUES", 0)
        bands = []
        real_band = engine.band_around
        monkeypatch.setattr(engine, "band_around", lambda *a: bands.append(1) or (
            (0.0, 0.0) if path == "band-missed" else real_band(*a)))
    fam = Family.open(family_dirs["base"], family_dirs["instruct"], family_dirs["experts"])
    selections = []
    real = engine._TensorVectors._select
    monkeypatch.setattr(engine._TensorVectors, "_select",
                        lambda self, k, experts: selections.extend(experts) or real(self, k, experts))
    points = [("uniform", 0.8), ("linear_rank", 1.0), ("log_rank", 0.6), ("linear_rank", 1.3)]  # uniform: all active
    for i, (weighting, lam) in enumerate(points):
        plan = plan_merge(fam, MergeConfig(method="ties", density=0.3, lam=lam), WeightingConfig(name=weighting),
                          progress=False)
        plan = plan.with_options(kernels=fused)
        before = len(selections)
        got = merge_state_dict(plan)
        # each expert's tensors are selected at the first point only, whatever the weights
        assert (len(selections) > 0) if i == 0 else (len(selections) == before), (weighting, lam)
        anchor = fam.anchor(plan.anchor)
        for name, merged in got.items():
            theta0 = anchor.get(name).float().reshape(-1)
            active = plan.active_experts(name)
            if not active:
                continue
            # the definition: thresholds selected on the weighted pure vectors themselves
            vectors = [pure_slice(fam.experts[k].get(name).reshape(-1), theta0, plan.weight(k, name), "cpu")
                       for k in active]
            expected = plan.method.delta(vectors, [plan.lams[k] for k in active], active, name) + theta0
            assert torch.equal(merged.reshape(-1), expected), (weighting, name)
    assert len(fam.selections) == len(selections)
    if path.startswith("band"):
        assert len(bands) == len(selections)


def test_global_ties_thresholds_are_shared_by_points_with_the_same_weights(family_dirs, monkeypatch):
    fam = Family.open(family_dirs["base"], family_dirs["instruct"], family_dirs["experts"])
    calls = []
    real = planning.global_threshold
    monkeypatch.setattr(planning, "global_threshold", lambda *a, **k: calls.append(1) or real(*a, **k))

    def thresholds(family, weighting, lam):
        merge = MergeConfig(method="ties", topk_scope="global", density=0.2, lam=lam)
        return plan_merge(family, merge, WeightingConfig(name=weighting), progress=False).thresholds

    first = thresholds(fam, "linear_rank", 1.0)
    assert len(calls) == 2  # one per expert
    assert thresholds(fam, "linear_rank", 0.4) == first and len(calls) == 2  # lambda only: reused
    other = thresholds(fam, "uniform", 1.0)
    assert len(calls) == 4 and other != first  # other weights: selected again
    fresh = Family.open(family_dirs["base"], family_dirs["instruct"], family_dirs["experts"])
    assert thresholds(fresh, "linear_rank", 0.4) == first


def test_uniform_ta_with_lambda_one_is_the_sum_of_task_vectors(family, family_dirs):
    got = run_engine(family, method="ta", weighting="uniform")
    inst = reference.load(family_dirs["instruct"])
    experts = [reference.load(p) for p in family_dirs["experts"].values()]
    for name in inst:
        expected = inst[name] + sum(e[name] - inst[name] for e in experts)
        assert torch.allclose(got[name], expected, atol=1e-6)


def test_forgetting_subtracts_the_pure_vector(family, family_dirs):
    got = run_engine(family, method="ta", weighting="uniform", lams={"math": -1.0, "code": 0.0})
    inst, math_ = reference.load(family_dirs["instruct"]), reference.load(family_dirs["experts"]["math"])
    for name in inst:
        assert torch.allclose(got[name], 2 * inst[name] - math_[name], atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(method="ta", weighting="threshold", threshold=0.8, lams={"math": -1.0}),
    dict(method="ta", weighting="linear_rank", lam=0.6),
    dict(method="ties", weighting="log_rank", density=0.3, lams={"math": -0.8}),
    dict(method="dare_ties", weighting="uniform", p=0.4, seed=3, anchor="base"),
])
@pytest.mark.parametrize("target", ["math", "outside"])
def test_a_target_gets_the_delta_instead_of_the_anchor(family_dirs, tmp_path, options, target):
    """theta = theta_target + sum_k lambda_k v_k, with the vectors still relative to the anchor."""
    if target == "outside":  # a checkpoint of the same shape that is not in the family
        path = write_family(tmp_path / "other", experts=("x",), seed=7)["experts"]["x"]
    else:
        path = family_dirs["experts"][target]
    fam = Family.open(family_dirs["base"], family_dirs["instruct"], family_dirs["experts"], target=str(path))
    assert (fam.target is fam.experts["math"]) == (target == "math")
    expected = reference.merge(family_dirs, **options, target=path)
    assert_state_close(run_engine(fam, **options), expected)
    # written to disk: the target's config and tokenizer files, the target named in the marker
    plan = plan_merge(fam, *engine_configs(options), progress=False)
    out = merge_to_dir(plan, tmp_path / "merged", progress=False)
    state = reference.load(out)
    assert_state_close(state, expected)
    import json
    assert json.loads((out / "lata_merge.json").read_text())["target"] == str(path)


def test_uniform_forgetting_from_the_expert_itself_gives_back_the_anchor(family_dirs):
    """The issue's forgetting form: subtract an expert's whole vector from that expert."""
    fam = Family.open(family_dirs["base"], family_dirs["instruct"], {"math": family_dirs["experts"]["math"]},
                      target=str(family_dirs["experts"]["math"]))
    got = run_engine(fam, method="ta", weighting="uniform", lam=-1.0)
    inst = reference.load(family_dirs["instruct"])
    for name in inst:
        assert torch.allclose(got[name], inst[name], atol=1e-6), name


def test_save_load_round_trip_and_in_place_merge(family, tmp_path):
    plan = plan_merge(family, MergeConfig(method="ties", density=0.2), WeightingConfig(name="linear_rank"),
                      progress=False)
    expected = merge_state_dict(plan)
    out = merge_to_dir(plan, tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    # in place into an already-loaded instruct model
    target = AutoModelForCausalLM.from_pretrained(family.instruct.path)
    merge_into_model(plan, target)
    for name, tensor in expected.items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_sharded_inputs_and_outputs_give_identical_results(tmp_path):
    dirs = write_family(tmp_path / "sharded", shard_size="20KB")
    assert (dirs["base"] / "model.safetensors.index.json").is_file()
    fam = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    plan = plan_merge(fam, MergeConfig(method="ties", density=0.3), WeightingConfig(name="log_rank"),
                      progress=False)
    expected = reference.merge(dirs, method="ties", weighting="log_rank", density=0.3)
    out = merge_to_dir(plan, tmp_path / "out", shard_size="16KB", progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert_state_close(reference.load(out), expected)


def test_bf16_family_keeps_anchor_dtype_or_out_dtype(tmp_path):
    dirs = write_family(tmp_path / "bf16", dtype=torch.bfloat16)
    fam = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    plan = plan_merge(fam, MergeConfig(method="ta"), WeightingConfig(name="linear_rank"), progress=False)
    bf16 = merge_to_dir(plan, tmp_path / "bf16out", progress=False)
    f32 = merge_to_dir(plan, tmp_path / "f32out", out_dtype="float32", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in reference.load(bf16).values())
    exact = reference.load(f32)
    assert all(t.dtype == torch.float32 for t in exact.values())
    expected = reference.merge(dirs, method="ta", weighting="linear_rank")  # float32 math, cast to bf16
    for name, tensor in reference.load(bf16).items():
        assert torch.equal(tensor, exact[name].to(torch.bfloat16)), name
        assert torch.equal(tensor, expected[name]), name
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16


def test_tied_embeddings_are_merged_once(tmp_path):
    dirs = write_family(tmp_path / "tied", tie_word_embeddings=True)
    fam = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    assert "lm_head.weight" not in fam.tensor_names
    plan = plan_merge(fam, MergeConfig(method="ta"), WeightingConfig(name="uniform"), progress=False)
    out = merge_to_dir(plan, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in reference.load(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, merge_state_dict(plan)["model.embed_tokens.weight"])


def test_a_method_outside_the_package_by_dotted_path(family, family_dirs, tmp_path, monkeypatch):
    """merge.method=package.module.Class: a user's own method, imported on use, no registration."""
    (tmp_path / "my_lab_methods.py").write_text(
        "from dataclasses import dataclass\n"
        "from lata.methods import MergeMethod\n"
        "from lata.registry import in_range\n\n"
        "@dataclass(frozen=True)\n"
        "class Scaled(MergeMethod):\n"
        "    factor: float = 1.0\n\n"
        "    def check(self):\n"
        "        in_range('merge.factor', self.factor, 0.0, 1.0)\n\n"
        "    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):\n"
        "        return super().delta_chunk(vectors, lams, experts, tensor, state, start, stop).mul_(self.factor)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = merge_state_dict(plan_merge(family, MergeConfig(method="my_lab_methods.Scaled", factor=0.5, lam=1.0),
                                      WeightingConfig(name="uniform"), progress=False))
    assert_state_close(got, reference.merge(family_dirs, method="ta", lam=0.5))
    from lata.config import ConfigError

    with pytest.raises(ConfigError, match=r"merge.factor=2.0 is out of range"):
        plan_merge(family, MergeConfig(method="my_lab_methods.Scaled", factor=2.0), progress=False)
