"""Resized vocabularies: experts (and instruct) with more or fewer embedding rows than the anchor.

Every method merges the rows every checkpoint shares; the output has the vocabulary
``model.vocab`` names (the anchor's, or an expert's), loads in transformers with that
vocabulary, and its shared rows equal a merge computed here by hand on those rows.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import write_family
from lata import CheckpointError, ConfigError, Family, MergeConfig, WeightingConfig, merge_to_dir, plan_merge
from lata.accel.compute import pure_slice

V = 48  # tests/conftest.py's tiny Llama vocabulary
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def resized(src, out, rows: int, seed: int):
    """``src`` with ``rows`` embedding rows (transformers' resize_token_embeddings), the new rows
    random, saved to ``out``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            if rows > V:
                weight[V:] = 0.02 * torch.randn_like(weight[V:])
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    d = write_family(root / "family")
    d["experts"] = {"math": resized(d["experts"]["math"], root / "math+64", V + 64, 1),
                    "code": resized(d["experts"]["code"], root / "code-8", V - 8, 2)}
    (d["experts"]["math"] / "chat_template.jinja").write_text("{{ messages }} (math's own template)")
    return d


def open_family(d, **kw):
    return Family.open(d["base"], d["instruct"], d["experts"], **kw)


def expected(family, plan, name, rows):
    """theta_0 + the method's delta on the shared rows, from the pure vectors computed here."""
    anchor = family.anchor(plan.anchor)
    theta0 = anchor.get(name)[:rows].float().reshape(-1)
    active = plan.active_experts(name)
    vectors = [pure_slice(family.experts[k].get(name)[:rows].reshape(-1), theta0, plan.weight(k, name), "cpu")
               for k in active]
    thresholds = None if plan.thresholds is None else [plan.thresholds[k] for k in active]
    delta = plan.method.delta(vectors, [plan.lams[k] for k in active], active, name, thresholds)
    return (theta0 + delta).view(rows, -1)


METHODS = {"ta": dict(method="ta", lam=0.7), "ties": dict(method="ties", density=0.3),
           "global-ties": dict(method="ties", density=0.3, topk_scope="global"), "dare": dict(method="dare", p=0.5)}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("vocab", ["anchor", "math"])
@pytest.mark.parametrize("staged", [False, True], ids=["sliced", "staged"])
def test_the_shared_rows_are_merged_and_the_output_has_the_chosen_vocabulary(family_dirs, tmp_path, method, vocab,
                                                                              staged, caplog):
    family = open_family(family_dirs, vocab=vocab)
    assert family.vocab_tensors == {EMBED, HEAD} and family.shared_rows == V - 8
    with caplog.at_level(logging.WARNING, logger="lata"):
        plan = plan_merge(family, MergeConfig(**METHODS[method]), WeightingConfig(name="linear_rank"),
                          progress=False).with_options(staged=staged, chunk_size=100)
    out = merge_to_dir(plan, tmp_path / "out", progress=False)
    got = load_file(str(out / "model.safetensors"))
    rows = V + 64 if vocab == "math" else V
    source = family.experts["math"] if vocab == "math" else family.instruct
    for name in (EMBED, HEAD):
        assert got[name].shape == (rows, 16)
        assert torch.equal(got[name][:V - 8], expected(family, plan, name, V - 8)), name
        assert torch.equal(got[name][V - 8:], source.get(name)[V - 8:]), name  # the source's own rows
    # every other tensor is merged as in a family without resizing
    name = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(got[name], expected(family, plan, name, got[name].shape[0]).view(got[name].shape))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    # the tokenizer side (here the chat template) comes with the vocabulary
    assert (out / "chat_template.jinja").is_file() == (vocab == "math")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    notes = caplog.text
    assert "expert 'math' has 72 embedding rows beyond the 40 every model shares" in notes or vocab == "math"
    assert "base has 8 embedding rows beyond the 40" in notes


def test_a_lora_expert_over_a_resized_instruct(tmp_path):
    import peft

    d = write_family(tmp_path / "family")
    instruct = resized(d["instruct"], tmp_path / "instruct+16", V + 16, 3)
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(instruct)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    wrapped.save_pretrained(tmp_path / "lora")
    family = Family.open(d["base"], instruct, {"math": tmp_path / "lora", "code": d["experts"]["code"]})
    assert family.shared_rows == V
    plan = plan_merge(family, MergeConfig(method="ta", anchor="base"), WeightingConfig(name="uniform"), progress=False)
    out = merge_to_dir(plan, tmp_path / "out", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert got[EMBED].shape == (V, 16)  # the anchor (base) has V rows
    assert torch.equal(got[EMBED], expected(family, plan, EMBED, V))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_what_no_policy_covers_is_refused_before_any_output(family_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"model.vocab='chem' is not allowed; choose anchor or an expert: "
                                              r"math, code"):
        open_family(family_dirs, vocab="chem")
    # a tensor inside the blocks may not change its shape
    d = write_family(tmp_path / "other")
    wide = write_family(tmp_path / "wide", intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \[16, 40\] in "
                                              r"expert 'math' .* but \[16, 32\] in base"):
        Family.open(d["base"], d["instruct"], {"math": wide["experts"]["math"]})
    # ids every model shares must be the same tokens
    for role, tokens in (("instruct", ["a", "b", "c"]), ("math", ["a", "c", "b"])):
        folder = family_dirs["instruct"] if role == "instruct" else family_dirs["experts"]["math"]
        (folder / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}}, "added_tokens": []}))
    try:
        with pytest.raises(CheckpointError, match=r"token id 1 is 'b' in instruct .* but 'c' in expert 'math'"):
            open_family(family_dirs)
    finally:
        for folder in (family_dirs["instruct"], family_dirs["experts"]["math"]):
            (folder / "tokenizer.json").unlink()


def test_the_command_takes_model_vocab_and_keys_its_points_by_it(family_dirs, tmp_path):
    from conftest import family_args, run_lata

    args = family_args(family_dirs) + ["merge=ta", "weighting=uniform"]
    run_lata(args + ["model.vocab=math", f"save_model={tmp_path / 'math'}"], tmp_path, run_dir=tmp_path / "r1")
    assert json.loads((tmp_path / "math" / "config.json").read_text())["vocab_size"] == V + 64
    assert json.loads((tmp_path / "math" / "lata_merge.json").read_text())["vocab"] == "math"
    run_lata(args + [f"save_model={tmp_path / 'anchor'}"], tmp_path, run_dir=tmp_path / "r2")
    points = [json.loads((tmp_path / r / "summary.json").read_text())["point"] for r in ("r1", "r2")]
    assert points[0] != points[1]  # another vocabulary: another point, never restored for the other
    assert json.loads((tmp_path / "anchor" / "config.json").read_text())["vocab_size"] == V
    refused = run_lata(args + ["model.vocab=chem"], tmp_path, check=False, run_dir=tmp_path / "r3")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "lata: error: model.vocab='chem' is not allowed; choose anchor or an expert: math, code")
