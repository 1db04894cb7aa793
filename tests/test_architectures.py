"""Layer mapping: every shipped architecture maps real tensor names to blocks, and an
architecture without a file is found from a checkpoint's config and tensor names."""

import json

import pytest

import lata.architectures as architectures
from lata.architectures import architecture_for, architecture_of, known_model_types
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


# ------------------------------------------------------------------ architectures found from a checkpoint

WHERE = "/ckpt/config.json (base)"


def block_names(prefix: str, layers: int, parts=("attn.q.weight", "mlp.up.weight")) -> list[str]:
    return [prefix.format(l=l) + part for l in range(layers) for part in parts]


def infer(config: dict, names: list[str]):
    return architecture_of({"model_type": "newarch", **config}, names, where=WHERE)


def refusal(config: dict, names: list[str]) -> str:
    with pytest.raises(CheckpointError) as caught:
        infer(config, names)
    message = str(caught.value)
    assert message.splitlines() == [message] and message.startswith(
        f"{WHERE}: cannot find the blocks of model_type 'newarch': ")
    assert message.endswith("; add lata/architectures/newarch.json")
    return message


@pytest.mark.parametrize("prefix, key", [
    ("model.layers.{l}.", "num_hidden_layers"),
    ("transformer.h.{l}.", "n_layer"),
    ("backbone.blocks.{l}.", "num_layers"),
    ("encoder.layer.{l}.", "n_layers"),
])
def test_numbered_blocks_and_their_count_make_an_architecture(prefix, key):
    names = ["tok.embed_tokens.weight", "norm.weight", *block_names(prefix, 3)]
    arch = infer({key: 3}, names)
    assert arch.layer_prefixes == (prefix,) and arch.num_layers_key == key
    assert [arch.layer_of(n) for n in names] == [None, None, 0, 0, 1, 1, 2, 2]
    assert arch.num_layers({key: 3}) == 3


def test_the_count_is_read_under_text_config_and_a_deeper_numbering_stays_in_its_block():
    names = ["language_model.model.embed_tokens.weight",
             *block_names("language_model.model.layers.{l}.", 2, ("mlp.experts.0.w1.weight", "mlp.experts.1.w1.weight",
                                                                   "mlp.gate.weight", "mlp.experts.gate_up_proj")),
             *block_names("vision_tower.encoder.layers.{l}.", 3)]
    arch = infer({"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 3}}, names)
    assert arch.layer_prefixes == ("language_model.model.layers.{l}.",)
    assert arch.layer_of("language_model.model.layers.1.mlp.experts.1.w1.weight") == 1
    assert arch.layer_of("language_model.model.layers.1.mlp.experts.gate_up_proj") == 1
    assert arch.layer_of("vision_tower.encoder.layers.1.attn.q.weight") is None
    assert arch.tied_weights == (("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"),)


def test_a_checkpoint_without_numbered_blocks_is_refused_naming_what_was_looked_for():
    message = refusal({"num_hidden_layers": 2}, ["embed.weight", "mixer.in_proj.weight", "norm_f.weight"])
    assert "no tensor name is numbered by block (looked for 'P.{l}.' for l = 0..L-1 (model.layers.{l}., " \
           "transformer.h.{l}., blocks.{l}., layer.{l}., ...); num_hidden_layers=2)" in message
    message = refusal({"hidden_size": 8}, block_names("model.layers.{l}.", 2))
    assert "its config gives no block count (looked for num_hidden_layers, n_layer, num_layers, n_layers, " \
           "also under text_config)" in message
    assert "is an encoder-decoder" in refusal({"is_encoder_decoder": True, "num_layers": 2},
                                              block_names("decoder.block.{l}.", 2))
    with pytest.raises(CheckpointError, match=r"^/ckpt/config.json \(base\): n_layer is '2', not a non-negative"):
        infer({"n_layer": "2"}, block_names("h.{l}.", 2))


def test_a_count_the_tensors_disagree_with_is_refused():
    message = refusal({"num_hidden_layers": 4}, block_names("model.layers.{l}.", 6))
    assert "num_hidden_layers=4, but no numbered tensors hold blocks 0..3" in message
    assert message.split("): ")[-1] == "'model.layers.{l}.' holds 0..5; add lata/architectures/newarch.json"
    gaps = [n for n in block_names("model.layers.{l}.", 4) if ".2." not in n]
    assert "'model.layers.{l}.' holds 0, 1, 3;" in refusal({"num_hidden_layers": 4}, gaps)
    late = block_names("model.layers.{l}.", 3)[2:]
    assert "'model.layers.{l}.' holds 1..2;" in refusal({"num_hidden_layers": 3}, late)


def test_several_block_lists_of_the_config_count():
    two = block_names("a.layers.{l}.", 2) + block_names("b.layers.{l}.", 2)
    message = refusal({"num_hidden_layers": 2}, two)
    assert "several prefixes hold blocks 0..1 (num_hidden_layers=2) with 4 tensors each: 'a.layers.{l}.', " \
           "'b.layers.{l}.'; name the blocks in layer_prefixes" in message
    # the one holding more tensors
    assert infer({"num_hidden_layers": 2}, two + ["b.layers.0.extra.weight"]).layer_prefixes == ("b.layers.{l}.",)
    # the one beside the token embedding, though the other holds more
    beside = two + ["b.layers.0.extra.weight", "a.embed_tokens.weight"]
    arch = infer({"num_hidden_layers": 2}, beside)
    assert arch.layer_prefixes == ("a.layers.{l}.",)
    assert arch.tied_weights == (("lm_head.weight", "a.embed_tokens.weight"),)


def test_tied_weights_of_an_inferred_architecture_follow_the_config():
    names = ["transformer.wte.weight", "transformer.wpe.weight", *block_names("transformer.h.{l}.", 2)]
    pair = {"lm_head.weight": "transformer.wte.weight"}
    # a type transformers does not know: tied by default when the output embedding is not stored
    arch = infer({"n_layer": 2}, names)
    assert arch.tied_weights == (("lm_head.weight", "transformer.wte.weight"),) and arch.tie_word_embeddings_default
    assert arch.tied_aliases({}) == pair
    assert arch.tied_aliases({"tie_word_embeddings": False}) == {}
    assert arch.tied_aliases({"text_config": {"tie_word_embeddings": False}}) == {}
    assert arch.tied_aliases({"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": False}}) == pair
    untied = infer({"n_layer": 2}, names + ["lm_head.weight"])
    assert untied.tied_weights == arch.tied_weights and not untied.tie_word_embeddings_default
    assert untied.tied_aliases({}) == {} and untied.tied_aliases({"tie_word_embeddings": True}) == pair
    neox = infer({"num_hidden_layers": 2}, ["gpt_neox.embed_in.weight", "embed_out.weight",
                                            *block_names("gpt_neox.layers.{l}.", 2)])
    assert neox.tied_weights == (("embed_out.weight", "gpt_neox.embed_in.weight"),)
    # a type transformers knows: its config class's default, whatever the tensors
    llama_like = ["model.embed_tokens.weight", *block_names("model.layers.{l}.", 2)]
    starcoder2 = architecture_of({"model_type": "starcoder2", "num_hidden_layers": 2},
                                 llama_like + ["lm_head.weight"], WHERE)
    assert starcoder2.tie_word_embeddings_default is True
    phi = architecture_of({"model_type": "phi", "num_hidden_layers": 2}, llama_like, WHERE)
    assert phi.tie_word_embeddings_default is False
    assert phi.tied_weights == (("lm_head.weight", "model.embed_tokens.weight"),)
    with pytest.raises(CheckpointError, match=r"^here: text_config.tie_word_embeddings is 'no', not true or false$"):
        arch.check_config({"text_config": {"tie_word_embeddings": "no"}}, "here")


def test_a_json_file_wins_whole_or_field_by_field(tmp_path, monkeypatch):
    # a file setting every field is the architecture, whatever the tensors
    assert architecture_of({"model_type": "llama"}, [], WHERE) == architecture_for("llama")
    monkeypatch.setattr(architectures, "DATA_DIR", tmp_path)
    (tmp_path / "newarch.json").write_text(json.dumps({"layer_prefixes": ["trunk.{l}."]}))
    names = ["embed_tokens.weight", "lm_head.weight", *block_names("trunk.{l}.", 2), *block_names("other.{l}.", 3)]
    arch = infer({"num_layers": 2}, names)
    assert arch.layer_prefixes == ("trunk.{l}.",) and arch.num_layers_key == "num_layers"
    assert arch.tied_weights == (("lm_head.weight", "embed_tokens.weight"),) and not arch.tie_word_embeddings_default
    (tmp_path / "newarch.json").write_text(json.dumps({"tied_weights": {}, "tie_word_embeddings_default": True}))
    arch = infer({"num_layers": 3}, names)
    assert arch.layer_prefixes == ("other.{l}.",) and arch.tied_weights == () and arch.tie_word_embeddings_default
    with pytest.raises(CheckpointError, match=r"newarch.json sets only some fields \(not layer_prefixes, "
                                              r"num_layers_key\): the rest is found from a checkpoint"):
        architecture_for("newarch")
    (tmp_path / "newarch.json").write_text(json.dumps({"layer_prefix": ["trunk.{l}."]}))
    with pytest.raises(ValueError, match="newarch.json: unknown fields layer_prefix"):
        infer({"num_layers": 2}, names)


def test_a_type_without_a_file_is_named_by_architecture_for():
    with pytest.raises(CheckpointError, match=r"^cfg: no architecture data for model_type 'mamba'; known: .*llama.* "
                                              r"Add lata/architectures/mamba.json.$"):
        architecture_for("mamba", where="cfg")
