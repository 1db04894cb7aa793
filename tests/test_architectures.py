"""Layer mapping is data: every shipped architecture maps real tensor names to blocks."""

import pytest

from lata.architectures import architecture_for, known_model_types
from lata.io.checkpoints import resolve
from lata.io.files import CheckpointError


@pytest.mark.parametrize("model_type, name, layer", [
    ("llama", "model.layers.0.self_attn.q_proj.weight", 0),
    ("llama", "model.layers.31.mlp.down_proj.weight", 31),
    ("llama", "model.embed_tokens.weight", None),
    ("llama", "model.norm.weight", None),
    ("llama", "lm_head.weight", None),
    ("mistral", "model.layers.7.input_layernorm.weight", 7),
    ("qwen2", "model.layers.12.self_attn.q_proj.bias", 12),
    ("gemma2", "model.layers.41.pre_feedforward_layernorm.weight", 41),
    ("gpt2", "transformer.h.11.attn.c_attn.weight", 11),
    ("gpt2", "h.3.mlp.c_fc.bias", 3),
    ("gpt2", "transformer.wte.weight", None),
    ("gpt2", "transformer.ln_f.weight", None),
])
def test_layer_of(model_type, name, layer):
    assert architecture_for(model_type).layer_of(name) == layer


def test_prefix_is_anchored_and_exact():
    llama = architecture_for("llama")
    assert llama.layer_of("model.layers.1x.weight") is None
    assert llama.layer_of("extra.model.layers.1.weight") is None


def test_tied_weights_follow_the_config():
    assert architecture_for("llama").tied_aliases({}) == {}
    assert architecture_for("llama").tied_aliases({"tie_word_embeddings": True}) == {
        "lm_head.weight": "model.embed_tokens.weight"}
    assert architecture_for("gemma2").tied_aliases({}) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert architecture_for("gpt2").num_layers({"n_layer": 12}) == 12


def test_known_types():
    assert {"llama", "mistral", "qwen2", "gemma2", "gpt2"} <= set(known_model_types())


def test_hub_ids_fail_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="'no-such-owner/no-such-model' is neither a local directory nor a hub model"):
        resolve("no-such-owner/no-such-model")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve("./relative/missing")
