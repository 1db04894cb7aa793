"""The fused numba kernels compute what the torch path computes.

Merges: the same values as the torch path, for TA and TIES, bfloat16 and float32 inputs and
outputs, one to three experts, weights and lambdas that round in float32. Similarities: the
kernel's sums are checked against float64 sums (they are the more exact of the two paths).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from conftest import write_family
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.accel import kernels
from lata import analysis
from lata.analysis import _gram, layer_similarities
from lata.accel.compute import pure_slice
from lata.methods import METHODS
from lata.selection import largest_below

CASES = [
    dict(method="ta", weighting="linear_rank"),
    dict(method="ta", weighting="uniform", lams={"math": 0.7, "code": -0.4}),
    dict(method="ties", weighting="log_rank", density=0.3),
    dict(method="ties", weighting="uniform", density=0.2, topk_scope="global", lam=0.9),
]


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_BYTES", 0)  # the kernels run for these small families too


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    return {
        "f32": write_family(root / "f32", hidden_size=32, intermediate_size=96, vocab_size=200),
        "bf16": write_family(root / "bf16", dtype=torch.bfloat16, hidden_size=32, intermediate_size=96,
                             vocab_size=200),
    }


def merged(d, case, use_kernels, out_dtype=None, threads=2):
    merge = MergeConfig(**{k: v for k, v in case.items() if k in ("method", "density", "topk_scope", "lam", "lams")})
    family = Family.open(d["base"], d["instruct"], d["experts"])
    plan = plan_merge(family, merge, WeightingConfig(name=case["weighting"]), progress=False, threads=threads)
    return merge_state_dict(plan.with_options(kernels=use_kernels, chunk_size=1000), out_dtype=out_dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['method']}-{c['weighting']}")
@pytest.mark.parametrize("family,out_dtype", [("f32", None), ("bf16", None), ("bf16", "float32"),
                                              ("f32", "bfloat16")])
def test_fused_merge_equals_the_torch_path(families, case, family, out_dtype):
    d = families[family]
    expected = merged(d, case, use_kernels=False, out_dtype=out_dtype)
    got = merged(d, case, use_kernels=True, out_dtype=out_dtype)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
    instruct = Family.open(d["base"], d["instruct"], d["experts"]).instruct
    changed = [n for n in got if not torch.equal(got[n], instruct.get(n).to(got[n].dtype))]
    assert len(changed) > len(got) // 3  # the merge did move the weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_kernels_match_the_methods_value_by_value(dtype, out_dtype, k):
    torch.manual_seed(k)
    n = 3 * kernels.BLOCK + 17  # several blocks and a ragged end
    theta0 = (torch.randn(n) * 0.02).to(dtype)
    theta0[:40] = 0
    experts = [(theta0.float() + torch.randn(n) * 1e-3 * (i + 1)).to(dtype) for i in range(k)]
    experts[0][100:200] = theta0[100:200]  # zero task vector: trimmed ties at 0, no vote
    ws, lams = [1.0, 0.7368421052631579, 0.3][:k], [1.0, -0.55, 1.3][:k]  # none exact in float32 but 1.0
    vectors = [pure_slice(e, theta0.float(), w, "cpu") for e, w in zip(experts, ws)]
    for method in (METHODS.build("ta", {}), METHODS.build("ties", {"density": 0.2})):
        expected = (method.delta(vectors, lams, list("abc")[:k], "t") + theta0.float()).to(out_dtype)
        out = torch.empty(n, dtype=out_dtype)
        fused = kernels.FusedSlices(theta0, experts, ws, out)
        for start in range(0, n, 5000):  # any slicing
            stop = min(n, start + 5000)
            if method.name == "ta":
                fused.ta(lams, start, stop)
            else:
                thresholds = [float(v.abs().sort(descending=True).values[math.ceil(0.2 * n) - 1]) for v in vectors]
                fused.ties(lams, [largest_below(t) for t in thresholds], start, stop)
        assert torch.equal(out, expected), method.name
    magnitudes = torch.empty(n)
    fused.magnitudes(k - 1, magnitudes, 0, n)
    assert torch.equal(magnitudes, pure_slice(experts[-1], theta0.float(), 1.0, "cpu").abs())  # unweighted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_band_counts_and_gathers_what_numpy_finds(dtype):
    torch.manual_seed(5)
    n = 5 * kernels.BLOCK + 33
    theta0 = (torch.randn(n) * 0.02).to(dtype)
    expert = (theta0.float() + torch.randn(n) * 1e-3).to(dtype)
    expert[:50] = theta0[:50]  # zeros
    expert[60], expert[61], theta0[62] = math.inf, math.nan, -math.inf  # |d|: inf, NaN, inf
    d = pure_slice(expert, theta0.float(), 1.0, "cpu").abs().numpy()
    fused = kernels.FusedSlices(theta0, [expert], [1.0], torch.empty(n, dtype=dtype))
    positions = np.array([0, 61, 7, n - 1])
    assert np.array_equal(fused.sample(0, positions), d[positions], equal_nan=True)
    finite = np.sort(d[np.isfinite(d)])
    for lo, hi in [(0.0, math.inf), (finite[n // 3], finite[n // 2]), (0.0, 0.0), (finite[-1], math.inf)]:
        out = np.full(n, -1.0, np.float32)
        for start in range(0, n, 4000):  # any slicing: each slice writes from its own start
            stop = min(n, start + 4000)
            above, inside = fused.band(0, lo, hi, out, start, stop)
            part = d[start:stop]
            assert above == int(((part > hi) | np.isnan(part)).sum()), (lo, hi, start)
            assert np.array_equal(out[start:start + inside], part[(part >= lo) & (part <= hi)]), (lo, hi, start)


def test_bfloat16_output_rounds_to_nearest_even_as_torch_casts():
    # float32 values on and around the halfway points between bfloat16 neighbours
    halfway = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 1.0 + 2 ** -8 + 2 ** -20, 3e38, 1e-40])
    theta0 = torch.zeros(halfway.numel())
    out = torch.empty(halfway.numel(), dtype=torch.bfloat16)
    kernels.FusedSlices(theta0, [halfway], [1.0], out).ta([1.0], 0, halfway.numel())
    assert torch.equal(out.view(torch.int16), halfway.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_the_kernels_flag_a_slice_with_a_value_that_is_not_finite_once_written(out_dtype):
    # float32 patterns at the edge: 0x7F7F7FFF is the largest that rounds to a finite bfloat16
    edge = torch.tensor([0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF], dtype=torch.int32).view(torch.float32)
    theta0 = torch.zeros(3)
    for values, finite in [(edge[:1], True), (edge[1:2], out_dtype == torch.float32), (edge[2:], out_dtype == torch.float32),
                           (torch.tensor([3e38]), True), (torch.tensor([-float("inf")]), False),
                           (torch.tensor([float("nan")]), False)]:
        row = torch.cat([torch.ones(2), values])
        out = torch.empty(3, dtype=out_dtype)
        slices = kernels.FusedSlices(theta0, [row], [1.0], out)
        flagged = slices.ta([1.0], 0, 3)
        assert (flagged == 0) == finite == bool(torch.isfinite(out).all()), (values, out_dtype)
        # TIES trims a NaN difference away (it is not above the threshold): the check is on what is written
        assert (slices.ties([1.0], [0.0], 0, 3) == 0) == bool(torch.isfinite(out).all()), (values, out_dtype)
        assert bool(torch.isfinite(out).all()) == (finite or bool(values.isnan().all())), (values, out_dtype)


def test_fused_similarity_sums_are_within_float32_product_rounding(families):
    d = families["f32"]
    family = Family.open(d["base"], d["instruct"], d["experts"])
    views = [c.get("model.embed_tokens.weight") for c in family.checkpoints]
    x = [(v.reshape(-1) - views[0].reshape(-1)).double() for v in views[1:]]  # the float32 differences
    fused = _gram(views, "cpu")
    # float32 products (2^-24 each) summed pairwise over blocks of 2048 (11 levels): below 1e-6
    assert fused[0][0] == pytest.approx(float(x[0] @ x[0]), rel=1e-6)
    for j in range(1, len(x)):
        assert fused[j][0] == pytest.approx(float(x[j] @ x[0]), rel=1e-6)
        assert fused[j][j] == pytest.approx(float(x[j] @ x[j]), rel=1e-6)


def test_fused_similarity_sums_do_not_depend_on_how_many_blocks_a_slice_holds(families, monkeypatch):
    d = families["bf16"]
    family = Family.open(d["base"], d["instruct"], d["experts"])
    monkeypatch.setattr(analysis, "BLOCK", 100)  # several blocks per tensor, a ragged last one
    results = []
    for values in (100, 350, 100_000):  # 1, 3 (not a multiple: rounded down) and 1000 blocks a slice
        monkeypatch.setattr(kernels, "SLICE", values)
        results.append(layer_similarities(family, progress=False, threads=2).to_dict())
    assert results[0] == results[1] == results[2]
    monkeypatch.setattr(analysis, "BLOCK", 1 << 18)  # one block per tensor: other sums
    assert layer_similarities(family, progress=False, threads=2).to_dict() != results[0]


def test_similarities_with_and_without_kernels_agree(families, monkeypatch):
    d = families["bf16"]
    family = Family.open(d["base"], d["instruct"], d["experts"])
    fused = layer_similarities(family, progress=False, threads=2)
    assert layer_similarities(family, progress=False, threads=1).similarities == fused.similarities
    monkeypatch.setenv("LATA_KERNELS", "torch")
    plain = layer_similarities(family, progress=False)
    for k in family.expert_names:
        assert plain.similarities[k] == pytest.approx(fused.similarities[k], abs=1e-5)


def test_small_families_take_the_torch_path(families, monkeypatch):
    d = families["bf16"]
    family = Family.open(d["base"], d["instruct"], d["experts"])
    used = []
    real_gram, real_ta = kernels.gram, kernels.FusedSlices.ta
    monkeypatch.setattr(kernels, "gram", lambda *a: used.append("gram") or real_gram(*a))
    monkeypatch.setattr(kernels.FusedSlices, "ta", lambda *a: used.append("ta") or real_ta(*a))
    monkeypatch.setattr(kernels, "MIN_BYTES", family.nbytes + 1)
    layer_similarities(family, progress=False)
    merged(d, CASES[0], use_kernels=True)
    assert used == []
    monkeypatch.setattr(kernels, "MIN_BYTES", family.nbytes)
    layer_similarities(family, progress=False)
    merged(d, CASES[0], use_kernels=True)
    assert set(used) == {"gram", "ta"}
    assert kernels.worthwhile(family.nbytes) and not kernels.worthwhile(family.nbytes, "cuda:0")


def test_what_takes_the_torch_path(monkeypatch):
    assert kernels.supports([torch.bfloat16] * 3, torch.bfloat16, "cpu")
    assert kernels.supports([torch.float32] * 2, None, "cpu")
    assert not kernels.supports([torch.float16] * 3, torch.float16, "cpu")
    assert not kernels.supports([torch.bfloat16, torch.float32], torch.float32, "cpu")
    assert not kernels.supports([torch.float32] * 2, torch.float16, "cpu")
    assert not kernels.supports([torch.float32] * 2, torch.float32, "cuda")
    monkeypatch.setenv("LATA_KERNELS", "torch")
    assert not kernels.available()


def test_a_numba_that_fails_to_load_leaves_the_torch_path(families, monkeypatch):
    d, case = families["bf16"], CASES[2]
    expected = merged(d, case, use_kernels=False)
    monkeypatch.setattr(kernels, "_compiled", False)  # as after an import error
    assert not kernels.available()
    got = merged(d, case, use_kernels=True)
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_cli_preloads_numba_only_for_large_local_families(families, monkeypatch):
    from omegaconf import OmegaConf

    from lata import cli

    d = families["f32"]
    calls = []
    monkeypatch.setattr(kernels, "preload", lambda: calls.append(1))

    def preloads(device="cpu", embedded=None, base=d["base"]):
        calls.clear()
        cfg = OmegaConf.create({"device": device, "model": {"embedded": embedded, "base": str(base),
                                "instruct": str(d["instruct"]),
                                "experts": {k: str(v) for k, v in d["experts"].items()}}})
        cli._preload_kernels(cfg)
        return bool(calls)

    on_disk = sum(f.stat().st_size for p in [d["base"], d["instruct"], *d["experts"].values()]
                  for f in Path(p).glob("*.safetensors"))
    monkeypatch.setattr(kernels, "MIN_BYTES", on_disk)
    assert preloads()
    assert not preloads(device="cuda")
    assert not preloads(embedded="zoo")
    assert not preloads(base="owner/hub-model")  # not a local directory: the runner decides later
    monkeypatch.setattr(kernels, "MIN_BYTES", on_disk + 1)
    assert not preloads()
