"""Many architectures, each built by transformers' own classes (tests/tiny_families.py): LATA
finds their blocks and tied embeddings from the checkpoints, merges them as the independent
reference does (tests/reference.py, which places tensors by the architecture written in the
test), and the merged checkpoint loads in transformers and computes the reference's logits."""

import pytest
import torch
from safetensors.torch import save_file

import reference
from tiny_families import FAMILIES, write_families
from lata import Family, MergeConfig, WeightingConfig, merge_to_dir, plan_merge
from lata.architectures import infer_architecture
from lata.io.checkpoints import Checkpoint

METHODS = {"ta": dict(method="ta"), "ties": dict(method="ties", density=0.3)}
OPTIONS = dict(weighting="linear_rank", lam=0.7)
TOKENS = torch.tensor([[1, 7, 42, 200, 3, 99, 128, 255, 0, 17]])


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    return write_families(tmp_path_factory.mktemp("families"))


def built(families, model_type) -> dict:
    dirs = families[model_type]
    if isinstance(dirs, Exception):
        pytest.xfail(f"transformers cannot build {model_type}: {type(dirs).__name__}: {dirs}")
    return dirs


def open_family(dirs) -> Family:
    return Family.open(dirs["base"], dirs["instruct"], dirs["experts"])


def load(path):
    """(model, loading info) of a checkpoint directory, by AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_architecture_is_found_from_the_checkpoint(families, model_type):
    """Inference alone (no JSON file), on every family, gives the blocks and the tied pair
    written in tiny_families; a family opened by LATA (JSON where one exists) agrees."""
    dirs = built(families, model_type)
    expected = FAMILIES[model_type][1]
    ckpt = Checkpoint(dirs["base"])
    inferred = infer_architecture(ckpt.config, ckpt.names, model_type, str(ckpt.config_file))
    assert inferred.layer_prefixes == (expected.prefix,)
    assert inferred.tied_weights == (expected.tied,)
    assert inferred.ties(ckpt.config) is expected.ties
    family = open_family(dirs)
    assert family.num_layers == 4
    for name in ckpt.names:
        match = expected.layer_regex.match(name)
        assert family.layer_of(name) == inferred.layer_of(name) == (int(match.group(1)) if match else None), name
    assert family.tied_aliases == (dict([expected.tied]) if expected.ties else {})


def test_moe_experts_and_router_belong_to_their_block_and_a_vision_tower_to_rest(families):
    moe = open_family(built(families, "qwen3_moe"))
    assert moe.layer_of("model.layers.3.mlp.experts.2.down_proj.weight") == 3
    assert moe.layer_of("model.layers.1.mlp.gate.weight") == 1
    mixtral = open_family(built(families, "mixtral"))
    assert mixtral.layer_of("model.layers.2.block_sparse_moe.experts.3.w1.weight") == 2
    gemma3 = open_family(built(families, "gemma3"))
    vision = [n for n in gemma3.tensor_names if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert any(".encoder.layers.3." in n for n in vision) and len(vision) > 16 * 4
    assert all(gemma3.layer_of(n) is None for n in vision)
    assert gemma3.layer_of("language_model.model.layers.3.mlp.up_proj.weight") == 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_merge_equals_the_reference_and_loads(families, model_type, method, tmp_path, monkeypatch):
    """TA and TIES (density 0.3), linear_rank, lam 0.7: every tensor within 1e-5 (relative
    norm) of the reference; the merged checkpoint loads with no missing, unexpected or
    mismatched key, and its logits equal those of the reference's state dict within 1e-5."""
    dirs = built(families, model_type)
    expected = FAMILIES[model_type][1]
    options = {**METHODS[method], **OPTIONS}
    family = open_family(dirs)
    plan = plan_merge(family, MergeConfig(method=options["method"], lam=0.7, **(
        {"density": 0.3} if method == "ties" else {})), WeightingConfig(name="linear_rank"), progress=False)
    out = merge_to_dir(plan, tmp_path / "merged", progress=False)

    monkeypatch.setattr(reference, "LAYER", expected.layer_regex)
    want = reference.merge(dirs, **options)
    got = reference.load(out)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        err = (got[name].double() - want[name].double()).norm() / want[name].double().norm().clamp(min=1e-12)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    assert any(not torch.equal(want[n], reference.load(dirs["instruct"])[n]) for n in want)  # it merged

    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    save_file(want, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    (ref_dir / "config.json").write_bytes((dirs["instruct"] / "config.json").read_bytes())
    merged, info = load(out)
    assert {k: v for k, v in info.items() if v} == {}, info
    ref_model, ref_info = load(ref_dir)
    assert {k: v for k, v in ref_info.items() if v} == {}, ref_info
    with torch.no_grad():
        logits, ref_logits = merged(TOKENS).logits, ref_model(TOKENS).logits
    assert logits.shape == (1, TOKENS.shape[1], 256)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    if expected.ties:
        output = merged.get_output_embeddings().weight
        assert output.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
