"""weighting=learned (layer-wise AdaMerging): the gradient path against the chain rule and finite
differences, its keys checked, and the run end to end (learned once, cached, written)."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import family_args, run_lata, save_tokenizer, tiny_llama_config, write_family_with_tokenizer
from lata import Family, MergeConfig, WeightingConfig, plan_merge
from lata.calibration import CalibrationExample
from lata.calibration.learned import (MergedModel, learn_weights, micro_batches, objective_sum, objective_value,
                                     scored_positions)
from lata.calibration.statistics import tokenized
from lata.registry import ConfigError
from lata.weightings import WEIGHTINGS

EXAMPLES = [CalibrationExample("what is ab? ", "ba."), CalibrationExample("rev dog: ", "god."),
            CalibrationExample("cab ", "bac.")]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family_with_tokenizer(tmp_path_factory.mktemp("learned"))


def objective_value_at(merged, params, batch, objective):
    """The objective with theta given directly (a leaf per parameter), as objective_value computes it."""
    original = merged.parameters
    merged.parameters = lambda w: params
    try:
        return objective_value(merged, None, batch, objective)
    finally:
        merged.parameters = original


def float64_merged(family, lams):
    """(the family, the instruct model in float64, theta(w) over it with ``lams``, EXAMPLES tokenized)."""
    fam = Family.open(family["base"], family["instruct"], family["experts"])
    model = AutoModelForCausalLM.from_pretrained(family["instruct"], dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(family["instruct"])
    return fam, model, MergedModel(model, fam, lams, 1.0), [tokenized(tokenizer, e, 64) for e in EXAMPLES]


@pytest.mark.parametrize("objective", ["entropy", "likelihood"])
def test_the_gradient_is_the_finite_difference(family, objective):
    fam, model, merged, batch = float64_merged(family, [0.7, 1.3])
    w = torch.tensor([[0.2, 0.9, 1.4, 0.5], [1.1, 0.3, 0.8, 1.7]], dtype=torch.float64, requires_grad=True)
    objective_value(merged, w, batch, objective).backward()
    # exactly the chain rule: dL/dw_{l,k} = lambda_k <dL/dtheta, d_k> over block l's tensors
    params = {n: p.detach().clone().requires_grad_(True) for n, p in merged.parameters(w.detach()).items()}
    loss = objective_value_at(merged, params, batch, objective)
    loss.backward()
    for k, lam in enumerate([0.7, 1.3]):
        for l in range(4):
            chain = sum(lam * float((params[n].grad * merged.vectors[n][k]).sum()) for n in params
                        if merged.blocks[n] == l)
            assert float(w.grad[k, l]) == pytest.approx(chain, rel=1e-9, abs=1e-15), (k, l)
    # and the finite difference (Llama's norms compute in float32: h = 1e-3 against that noise)
    h = 1e-3
    for k in range(2):
        for l in range(4):
            e = torch.zeros_like(w)
            e[k, l] = h
            with torch.no_grad():
                fd = (objective_value(merged, w + e, batch, objective) - objective_value(merged, w - e, batch, objective)) / (2 * h)
            assert float(w.grad[k, l]) == pytest.approx(float(fd), rel=2e-3, abs=1e-6), (k, l)
    # theta(w) is theta_0 + sum_k lambda_k w_{l,k} d_k: at w = 0 the anchor itself
    zero = merged.parameters(torch.zeros_like(w))
    assert all(torch.equal(zero[n], p) for n, p in model.named_parameters() if fam.layer_of(n) is not None)


@pytest.mark.parametrize("objective", ["entropy", "likelihood"])
def test_padded_micro_batches_give_each_example_its_own_objective(family, objective):
    _, _, merged, batch = float64_merged(family, [1.0, 1.0])
    assert len({ids.shape[1] for ids, _ in batch}) > 1  # padding is exercised
    params = merged.parameters(torch.ones(2, 4, dtype=torch.float64))
    whole, count = objective_sum(merged, params, batch, objective)
    alone = [objective_sum(merged, params, [b], objective) for b in batch]
    assert count == sum(n for _, n in alone) == sum(scored_positions(ids.shape[1], s, objective) for ids, s in batch)
    assert float(whole) == pytest.approx(sum(float(t) for t, _ in alone), rel=1e-12)
    # micro-batches keep the order and stay within the budget (one example at least)
    longest = max(ids.shape[1] for ids, _ in batch)
    assert micro_batches(batch, budget=1) == [[b] for b in batch]
    assert micro_batches(batch, budget=longest * 2) == [batch[:2], batch[2:]]


def one_block_family(root, seed: int, block: int = 2) -> list[CalibrationExample]:
    """A family where block ``block`` alone carries the task and the others' vectors are noise.

    The task: after a five-letter word and ":", its first letter three times and "." (it needs
    the prompt). A tiny random Llama (initializer_range 0.3, so that its frozen head can be
    confident) has that block alone fine-tuned on 32 examples (Adam, 300 steps); the expert is
    the fine-tuned model with every other block moved by Gaussian noise of the same norm, tensor
    by tensor, as the task block's change. Base and instruct are the random model (the anchor)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(hidden_size=32, intermediate_size=64, initializer_range=0.3)
    start = LlamaForCausalLM(config)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(32)]
    examples = [CalibrationExample(f"{w}:", w[0] * 3 + ".") for w in words]
    save_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    ids = torch.cat([tokenized(tokenizer, e, 64)[0] for e in examples])  # all six prompt + four answer tokens
    tuned = LlamaForCausalLM(config)
    tuned.load_state_dict(start.state_dict())
    prefix = f"model.layers.{block}."
    for name, p in tuned.named_parameters():
        p.requires_grad_(name.startswith(prefix))
    optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        logp = torch.log_softmax(tuned(input_ids=ids).logits[:, :-1], -1)
        loss = -logp[:, 5:].gather(2, ids[:, 6:, None]).mean()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1  # the block learned the task
    before, after = start.state_dict(), tuned.state_dict()
    noise = torch.Generator().manual_seed(seed + 100)
    expert = {}
    for name, value in before.items():
        if name.startswith(prefix) or not name.startswith("model.layers."):
            expert[name] = after[name].clone()
        else:  # noise as large as the task block's change of the same tensor
            same = ".".join(["model", "layers", str(block), *name.split(".")[3:]])
            step = torch.randn(value.shape, generator=noise)
            expert[name] = value + step * ((after[same] - before[same]).norm() / step.norm())
    for role, state in (("base", before), ("instruct", before), ("task", expert)):
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        model.save_pretrained(root / role)
        save_tokenizer(root / role)
    return examples


@pytest.mark.slow
def test_the_learned_weights_single_out_the_one_block_that_carries_the_task(tmp_path):
    """Over six constructed families (seeds 0-5), block 2 gets the largest learned weight in at
    least five with each objective (measured: likelihood 5 of 6, seed 4 stopping at a stationary
    point that keeps block 0; entropy 6 of 6)."""
    singled = {"likelihood": 0, "entropy": 0}
    for seed in range(6):
        root = tmp_path / f"seed{seed}"
        examples = one_block_family(root, seed)
        fam = Family.open(root / "base", root / "instruct", {"task": root / "task"})
        model = AutoModelForCausalLM.from_pretrained(root / "instruct", dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(root / "instruct")
        for objective in singled:
            w = learn_weights(model, tokenizer, fam, [1.0], 1.0, {"task": examples}, objective=objective, steps=100,
                              lr=0.05)["task"]
            singled[objective] += max(range(4), key=lambda l: w[l]) == 2
            if objective == "likelihood" and seed != 4:  # the task block near 1, the early noise blocks near 0
                assert 0.9 < w[2] < 1.2 and max(w[0], w[1]) < 0.05, (seed, w)
    assert singled["likelihood"] >= 5 and singled["entropy"] >= 5, singled


def test_learned_needs_its_weights_and_checks_its_keys(family):
    fam = Family.open(family["base"], family["instruct"], family["experts"])
    with pytest.raises(ConfigError, match="weighting=learned needs weights learned from calibration data"):
        plan_merge(fam, MergeConfig(), WeightingConfig(name="learned"), progress=False)
    plan = plan_merge(fam, MergeConfig(), WeightingConfig(name="learned"), progress=False,
                      learned_weights={"math": [0.1, 0.2, 0.3, 0.4], "code": [1.0, 0.0, 1.0, 0.0]})
    assert plan.weights == {"math": [0.1, 0.2, 0.3, 0.4], "code": [1.0, 0.0, 1.0, 0.0]}
    with pytest.raises(ConfigError, match="3 learned weights for expert 'math', whose family has 4 blocks"):
        plan_merge(fam, MergeConfig(), WeightingConfig(name="learned"), progress=False,
                   learned_weights={"math": [0.1, 0.2, 0.3], "code": [1.0, 0.0, 1.0, 0.0]})
    for key, value, message in (("objective", "kl", "weighting.objective='kl' is not allowed"),
                                ("steps", 0, "weighting.steps=0 must be a whole number"),
                                ("init", 3.0, r"weighting.init=3.0 must lie in \[weighting.low, weighting.high\]")):
        with pytest.raises(ConfigError, match=message):
            plan_merge(fam, MergeConfig(), WeightingConfig(name="learned", **{key: value}), progress=False)


def test_a_run_learns_once_writes_the_weights_and_reuses_them(family, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in EXAMPLES))
    args = [*family_args(family), "merge=ties", "weighting=learned",
            "weighting.steps=3", "calibration=jsonl", "calibration.max_length=64",
            *(f"++calibration.files.{k}={data}" for k in family["experts"]), f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.results_dir={tmp_path / 'results'}"]
    run_lata(args, tmp_path, run_dir=tmp_path / "run1")
    (built,) = (tmp_path / "cache" / "learned").glob("weights-*")
    stored = json.loads((built / "weights.json").read_text())
    assert len(stored["objective"]) == 3
    analysis = json.loads((tmp_path / "run1" / "layer_analysis.json").read_text())
    assert analysis["weights"] == stored["weights"] and (tmp_path / "run1" / "layer_analysis.png").is_file()
    # LATA's own (linear_rank) weights beside them, for the comparison
    assert analysis["beside"]["linear_rank (LATA)"] == {
        k: WEIGHTINGS.build("linear_rank", {}).weights_for(s) for k, s in analysis["similarities"].items()}
    stamp = (built / "weights.json").stat().st_mtime_ns
    run_lata([*args, "resume=false"], tmp_path, run_dir=tmp_path / "run2")
    assert (built / "weights.json").stat().st_mtime_ns == stamp
    result = run_lata([*args, "calibration=none"], tmp_path, run_dir=tmp_path / "run3", check=False)
    assert result.returncode != 0 and "weighting=learned learns from calibration data, and calibration gives none" \
        in result.stderr
