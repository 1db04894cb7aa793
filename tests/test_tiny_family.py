"""The tiny Llama family: real, loadable, distinct, deterministic and cached."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lata.zoo.cache import MARKER, cache_key, cached_build
from lata.zoo.tiny import (TinyFamily, build_tiny_family, code_examples, encode,
                           math_examples)

LAYER_TENSOR = "model.layers.0.self_attn.q_proj.weight"


def roles(family: TinyFamily) -> dict[str, Path]:
    return {"base": family.base, "instruct": family.instruct, **family.experts}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def family(tiny_cache) -> TinyFamily:
    return build_tiny_family(tiny_cache, progress=False)


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, family) -> tuple[TinyFamily, Path]:
    """A second build in another cache dir that already holds a half-built target."""
    cache = tmp_path_factory.mktemp("zoo-b")
    half = cache / family.base.parent.name
    (half / "base").mkdir(parents=True)
    (half / "base" / "model.safetensors").write_bytes(b"truncated")
    return build_tiny_family(cache, progress=False), half


# ------------------------------------------------------------------------------- the family


def test_all_roles_load_as_llama(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(family.experts) == {"math", "code"}
    for role, path in roles(family).items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama", role
        assert model.config.num_hidden_layers == 4 and not model.config.tie_word_embeddings
        assert model.config.vocab_size == len(tok)
        assert next(model.parameters()).dtype == torch.float32
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        assert model.config.eos_token_id == tok.eos_token_id
        assert (path / "generation_config.json").is_file()
        text = "### Instruction:\nReverse the word 'cat'.\n### Response:\ntac"
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_roles_have_same_layout_but_different_weights(family):
    sds = {role: weights(path) for role, path in roles(family).items()}
    ref = sds["base"]
    for role, sd in sds.items():
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}, role
    for (ra, a), (rb, b) in itertools.combinations(sds.items(), 2):
        diff = (a[LAYER_TENSOR] - b[LAYER_TENSOR]).abs().max().item()
        assert diff > 1e-4, f"{ra} and {rb} share {LAYER_TENSOR}"


def _mean_loss(path: Path, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = encode(tok, texts, 64)
    width = max(map(len, ids))
    inp = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(inp)
    for i, row in enumerate(ids):
        inp[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    with torch.no_grad():
        return model(input_ids=inp, attention_mask=mask,
                     labels=inp.masked_fill(mask == 0, -100)).loss.item()


def test_experts_learned_their_domain(family):
    held_math = math_examples(random.Random(12345), 32)
    held_code = code_examples(random.Random(12345), 32)
    instruct_math = _mean_loss(family.instruct, held_math)
    instruct_code = _mean_loss(family.instruct, held_code)
    assert _mean_loss(family.experts["math"], held_math) < instruct_math
    assert _mean_loss(family.experts["code"], held_code) < instruct_code


# ------------------------------------------------------------------------------- caching


def test_second_call_reuses_cache(family):
    root = family.base.parent
    marker = root / MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_tiny_family(root.parent, progress=False)
    assert time.perf_counter() - start < 2.0
    assert again == family
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["kind"] == "tiny"


def test_half_built_dir_is_rebuilt(rebuilt):
    fam, half = rebuilt
    assert fam.base.parent == half
    assert (half / MARKER).is_file()
    assert len(weights(fam.base)) > 0  # the truncated file was replaced
    assert not [p for p in half.parent.iterdir() if ".tmp-" in p.name]


def test_builds_are_bit_identical(family, rebuilt):
    other, _ = rebuilt
    for role, path in roles(family).items():
        a, b = weights(path), weights(roles(other)[role])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{role}:{k}"
        assert (path / "tokenizer.json").read_bytes() == \
            (roles(other)[role] / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------- cached_build


def test_cached_build_keys_and_markers(tmp_path):
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        (d / "out.txt").write_text("ok")

    first = cached_build(tmp_path, "toy", {"n": 1}, build, "1")
    assert first.name == f"toy-{cache_key('toy', {'n': 1}, '1')}"
    assert (first / "out.txt").read_text() == "ok" and (first / MARKER).is_file()
    assert cached_build(tmp_path, "toy", {"n": 1}, build, "1") == first
    assert len(calls) == 1
    assert cached_build(tmp_path, "toy", {"n": 2}, build, "1") != first
    assert cached_build(tmp_path, "toy", {"n": 1}, build, "2") != first
    assert len(calls) == 3


def test_failed_build_leaves_nothing(tmp_path):
    def build(d: Path) -> None:
        (d / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_build(tmp_path, "toy", {}, build, "1")
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_callers_build_once(tmp_path):
    calls = []

    def build(d: Path) -> None:
        calls.append(d)
        time.sleep(0.3)
        (d / "out.txt").write_text("ok")

    results = []
    threads = [threading.Thread(
        target=lambda: results.append(cached_build(tmp_path, "toy", {}, build, "1")))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
