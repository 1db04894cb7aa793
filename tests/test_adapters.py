"""LoRA adapters as experts: LATA's merge of an adapter equals its merge of the same adapter
merged into a full checkpoint by PEFT (``merge_and_unload``), and bad adapters are refused by
name before any work."""

import json
import logging
import shutil

import peft  # a test dependency (pyproject dev extra)
import pytest
import torch
from safetensors.torch import load_file, save_file

import reference
from conftest import family_args, run_lata, write_family
from lata import CheckpointError, Family, MergeConfig, WeightingConfig, merge_state_dict, plan_merge
from lata.io.adapters import AdapterCheckpoint
from lata.run.fingerprints import checkpoint_digest as fingerprint



def make_adapter(instruct, out, seed, **lora):
    """A LoRA adapter on ``instruct`` with random factors (PEFT starts B at 0), saved by PEFT,
    and the same adapter merged into a full checkpoint by PEFT (``out``-merged)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(instruct)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    wrapped.save_pretrained(out)
    merged = wrapped.merge_and_unload()
    merged.save_pretrained(f"{out}-merged")
    return out, f"{out}-merged"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    d = write_family(root / "family")
    math_adapter, math_full = make_adapter(
        d["instruct"], root / "math-lora", 1, r=4, lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    code_adapter, code_full = make_adapter(
        d["instruct"], root / "code-lora", 2, r=8, lora_alpha=4, use_rslora=True,
        target_modules=["gate_proj", "up_proj", "o_proj"], modules_to_save=["lm_head"])
    return {"family": d, "math": (math_adapter, math_full), "code": (code_adapter, code_full)}


def merged(d, experts, merge, weighting):
    family = Family.open(d["base"], d["instruct"], experts)
    return merge_state_dict(plan_merge(family, merge, weighting, progress=False))


CASES = [(MergeConfig(method="ta", lam=0.8), WeightingConfig(name="uniform")),
         (MergeConfig(method="ties", density=0.3), WeightingConfig(name="uniform")),
         (MergeConfig(method="ta", lam=1.2), WeightingConfig(name="linear_rank")),
         (MergeConfig(method="ties", density=0.4), WeightingConfig(name="log_rank"))]


@pytest.mark.parametrize("merge,weighting", CASES, ids=lambda c: getattr(c, "method", None) or c.name)
def test_an_adapter_expert_merges_as_its_merged_checkpoint(adapters, merge, weighting):
    d = adapters["family"]
    with_adapters = merged(d, {"math": adapters["math"][0], "code": adapters["code"][0]}, merge, weighting)
    with_checkpoints = merged(d, {"math": adapters["math"][1], "code": adapters["code"][1]}, merge, weighting)
    for name, value in with_checkpoints.items():
        assert torch.allclose(with_adapters[name], value, rtol=0, atol=1e-6), name
    instruct = reference.load(d["instruct"])
    touched = [n for n in with_adapters if not torch.equal(with_adapters[n], instruct[n])]
    assert any("q_proj" in n for n in touched) and any("gate_proj" in n for n in touched)


def test_a_family_of_one_adapter_and_one_full_checkpoint(adapters):
    d = adapters["family"]
    merge, weighting = MergeConfig(method="ties", density=0.3), WeightingConfig(name="linear_rank")
    mixed = merged(d, {"math": adapters["math"][0], "code": d["experts"]["code"]}, merge, weighting)
    full = merged(d, {"math": adapters["math"][1], "code": d["experts"]["code"]}, merge, weighting)
    for name, value in full.items():
        assert torch.allclose(mixed[name], value, rtol=0, atol=1e-6), name


def test_the_adapters_deltas_follow_peft_scaling(adapters):
    d = adapters["family"]
    family = Family.open(d["base"], d["instruct"], {"math": adapters["math"][0], "code": adapters["code"][0]})
    math, code = family.experts["math"], family.experts["code"]
    assert isinstance(math, AdapterCheckpoint) and isinstance(code, AdapterCheckpoint)
    q, v, down = (f"model.layers.1.{m}.weight" for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert math.loras[q].scaling == 8 / 4 and math.loras[v].scaling == 3 / 4 and math.loras[down].scaling == 8 / 2
    assert code.loras["model.layers.0.mlp.gate_proj.weight"].scaling == pytest.approx(4 / 8 ** 0.5)
    assert "lm_head.weight" in code.replaced  # modules_to_save: replaced whole
    factors = load_file(str(adapters["math"][0] / "adapter_model.safetensors"))
    a = factors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = factors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert torch.allclose(math.delta(v), b @ a * 0.75, rtol=0, atol=1e-7)
    assert math.delta("model.layers.1.mlp.gate_proj.weight") is None  # not targeted: instruct's own
    assert torch.equal(math.get("model.layers.1.mlp.gate_proj.weight"),
                       family.instruct.get("model.layers.1.mlp.gate_proj.weight"))


def edited_adapter(adapters, tmp_path, config=None, rename=None):
    out = tmp_path / "edited"
    shutil.copytree(adapters["math"][0], out)
    if config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if rename:
        tensors = load_file(str(out / "adapter_model.safetensors"))
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("config,message", [
    ({"use_dora": True}, r"uses DoRA \(use_dora in adapter_config.json\)"),
    ({"peft_type": "IA3"}, r"is a IA3 adapter .*LoRA adapters only"),
    ({"peft_type": "LOKR"}, r"is a LOKR adapter"),
    ({"lora_bias": True}, r"uses LoRA biases"),
])
def test_unsupported_adapters_are_refused_by_name(adapters, tmp_path, config, message):
    d = adapters["family"]
    bad = edited_adapter(adapters, tmp_path, config=config)
    with pytest.raises(CheckpointError, match=message):
        Family.open(d["base"], d["instruct"], {"math": bad})


def test_a_module_the_model_lacks_is_refused(adapters, tmp_path):
    d = adapters["family"]
    bad = edited_adapter(adapters, tmp_path, rename=("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"))
    with pytest.raises(CheckpointError, match=r"targets module 'model.layers.1.self_attn.qkv_proj', which the "
                                              r"model .* does not have"):
        Family.open(d["base"], d["instruct"], {"math": bad})


def test_an_adapter_for_another_shape_is_refused_and_another_base_warned(adapters, tmp_path, caplog):
    wide = write_family(tmp_path / "wide", hidden_size=24)
    adapter, _ = make_adapter(wide["instruct"], tmp_path / "wide-lora", 3, r=2, lora_alpha=2,
                              target_modules=["q_proj"])
    d = adapters["family"]
    with pytest.raises(CheckpointError, match=r"module 'model.layers.0.self_attn.q_proj': B @ A has shape "
                                              r"\[24, 24\], but the model's .* is \[16, 16\]"):
        Family.open(d["base"], d["instruct"], {"math": adapter})
    other = edited_adapter(adapters, tmp_path, config={"base_model_name_or_path": "someone/other-model"})
    with caplog.at_level(logging.WARNING, logger="lata"):
        Family.open(d["base"], d["instruct"], {"math": other})
    assert "was trained on 'someone/other-model'" in caplog.text


def test_the_fingerprint_follows_the_adapters_config(adapters, tmp_path):
    before = fingerprint(edited_adapter(adapters, tmp_path))
    assert fingerprint(edited_adapter(adapters, tmp_path / "b", config={"lora_alpha": 9})) != before


def test_the_cli_merges_an_adapter_expert(adapters, tmp_path):
    d = adapters["family"]
    family = dict(d, experts={"math": adapters["math"][0], "code": d["experts"]["code"]})
    run_lata(family_args(family) + ["merge=ta", "weighting=linear_rank", f"save_model={tmp_path / 'out'}"], tmp_path)
    expected = merged(d, {"math": adapters["math"][1], "code": d["experts"]["code"]}, MergeConfig(method="ta"),
                      WeightingConfig(name="linear_rank"))
    got = reference.load(tmp_path / "out")
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=0, atol=1e-6), name
