"""Model Stock: the ratio by hand, the merge against mergekit's formula written here, per-row ratios,
every engine path with the same bits, and a bent formula that the checks catch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import write_family
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.accel.compute import pure_slice
from lata.methods.model_stock import stock_ratio
from lata.selection import block_gram


def gram_of(*vectors):
    flat = [torch.tensor(v, dtype=torch.float32) for v in vectors]
    return block_gram(lambda a, b: [v[a:b] for v in flat], len(vectors[0]))


def test_the_ratio_by_hand():
    c = 1 / math.sqrt(2)  # cos([1, 0], [1, 1])
    assert float(stock_ratio(gram_of([1, 0], [1, 1]))[0]) == pytest.approx(2 * c / (1 + c), rel=1e-12)
    # three vectors: the mean of the three pairwise cosines (1, 0, 0)
    cos = (1 + 0 + 0) / 3
    assert float(stock_ratio(gram_of([1, 0, 0], [2, 0, 0], [0, 1, 0]))[0]) == pytest.approx(3 * cos / (1 + 2 * cos))
    # identical vectors: t = 1 (the mean of the experts); orthogonal: t = 0 (theta_0)
    assert float(stock_ratio(gram_of([1, 2], [1, 2]))[0]) == pytest.approx(1.0)
    assert float(stock_ratio(gram_of([1, 0], [0, 3]))[0]) == 0.0
    # a zero vector: the norm product is held at 1e-6, as mergekit does, so cos = 0
    assert float(stock_ratio(gram_of([0, 0], [1, 1]))[0]) == 0.0


def test_the_gram_does_not_depend_on_the_blocks(monkeypatch):
    from lata import selection

    torch.manual_seed(0)
    vs = [torch.randn(6000) for _ in range(3)]
    whole = block_gram(lambda a, b: [v[a:b] for v in vs], 6000)
    expected = torch.stack([v.double() for v in vs])
    assert torch.allclose(whole[0], expected @ expected.T, rtol=1e-13)
    rows = block_gram(lambda a, b: [v[a:b] for v in vs], 6000, row=100)
    monkeypatch.setattr(selection, "GRAM_BLOCK", 1000)  # another block size: per-row sums stay whole rows
    assert torch.equal(block_gram(lambda a, b: [v[a:b] for v in vs], 6000, row=100), rows)
    assert torch.allclose(rows[7], (expected[:, 700:800] @ expected[:, 700:800].T), rtol=1e-13)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    d = write_family(tmp_path_factory.mktemp("stock"), experts=("math", "code", "chem"), hidden_size=32,
                     intermediate_size=64)
    return Family.open(d["base"], d["instruct"], d["experts"])


def mergekit_model_stock(theta0: np.ndarray, thetas: list[np.ndarray], filter_wise: bool) -> np.ndarray:
    """mergekit 0.1.5's model_stock, written from its formula in float64 numpy."""
    shape = theta0.shape
    w0 = theta0.reshape(1, -1) if not filter_wise or theta0.ndim == 1 else theta0.reshape(shape[0], -1)
    ws = [t.reshape(w0.shape) for t in thetas]
    offsets = [w - w0 for w in ws]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = np.maximum(np.linalg.norm(offsets[i], axis=-1) * np.linalg.norm(offsets[j], axis=-1), 1e-6)
            cos.append(np.clip((offsets[i] * offsets[j]).sum(-1) / norms, -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_uniform_weights_and_lambda_one_give_mergekits_merge(family, filter_wise):
    plan = plan_merge(family, MergeConfig(method="model_stock", filter_wise=filter_wise),
                      WeightingConfig(name="uniform"), progress=False)
    got = merge_state_dict(plan)
    anchor = family.anchor("instruct")
    for name in family.tensor_names:
        theta0 = anchor.get(name).double().numpy()
        expected = mergekit_model_stock(theta0, [family.experts[k].get(name).double().numpy()
                                                 for k in family.expert_names], filter_wise)
        np.testing.assert_allclose(got[name].double().numpy(), expected, rtol=2e-6, atol=1e-7, err_msg=name)


def test_weights_lambdas_and_a_dropped_layer(family):
    """delta = t/N sum_k lambda_k v_k over the active experts; a layer a weighting drops for every
    expert but one takes that expert's vector whole (t = 1)."""
    weights = [1.0, 0.5, 0.0, 2.0]
    plan = plan_merge(family, MergeConfig(method="model_stock", lams={"math": 0.5, "code": 1.5, "chem": 1.0}),
                      WeightingConfig(name="explicit", weights=weights), progress=False)
    got = merge_state_dict(plan)
    anchor = family.anchor("instruct")
    for name in family.tensor_names:
        theta0 = anchor.get(name).float().reshape(-1)
        active = plan.active_experts(name)
        vs = [pure_slice(family.experts[k].get(name).reshape(-1), theta0, plan.weight(k, name), "cpu") for k in active]
        if not active:
            assert torch.equal(got[name].reshape(-1), theta0), name
            continue
        g = torch.stack([v.double() for v in vs])
        t = stock_ratio((g @ g.T).unsqueeze(0))[0] if len(vs) > 1 else torch.tensor(1.0, dtype=torch.float64)
        delta = sum(plan.lams[k] * v.double() for k, v in zip(active, vs)) * (t / len(vs))
        torch.testing.assert_close(got[name].reshape(-1).double(), theta0.double() + delta, rtol=1e-6, atol=1e-7)
    assert plan.weights["math"][2] == 0.0 and plan.active_experts("model.layers.2.mlp.up_proj.weight") == []


@pytest.mark.parametrize("filter_wise", [False, True])
def test_every_path_gives_the_same_bits(family, filter_wise):
    plan = plan_merge(family, MergeConfig(method="model_stock", filter_wise=filter_wise, lam=0.8),
                      WeightingConfig(name="linear_rank"), progress=False)
    plain = merge_state_dict(plan)
    for options in (dict(chunk_size=37, threads=2), dict(staged=True, chunk_size=53), dict(chunk_size=1 << 20)):
        got = merge_state_dict(plan.with_options(**options))
        assert all(torch.equal(got[n], plain[n]) for n in plain), options
    # the whole-tensor form of the method (MergeMethod.delta) gives the same values
    name = next(n for n in family.tensor_names if n.endswith("down_proj.weight") and len(plan.active_experts(n)) > 1)
    anchor = family.anchor("instruct")
    theta0 = anchor.get(name).float()
    active = plan.active_experts(name)
    vs = [pure_slice(family.experts[k].get(name), theta0, plan.weight(k, name), "cpu") for k in active]
    whole = theta0 + plan.method.delta(vs, [plan.lams[k] for k in active], active, name)
    assert torch.equal(whole, plain[name])


def test_a_bent_ratio_is_caught(family, monkeypatch):
    """Without the (N - 1) term the merge moves: the formula check above would fail."""
    from lata.methods import model_stock

    plan = plan_merge(family, MergeConfig(method="model_stock"), WeightingConfig(name="uniform"), progress=False)
    right = merge_state_dict(plan)
    monkeypatch.setattr(model_stock, "stock_ratio", lambda g: stock_ratio(g) * (1 + 2 * 0.5) / (1 + 0.5))
    family.selections.clear()
    bent = merge_state_dict(plan)
    assert any(not torch.allclose(bent[n], right[n], rtol=1e-6, atol=1e-7) for n in right)
