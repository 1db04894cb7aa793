"""Shared fixtures: small random-but-structured Llama checkpoint families written to disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


LATA = [sys.executable, "-m", "lata"]


def run_lata(args, tmp_path, env_extra=None, check=True, run_dir=None):
    """The ``lata`` command in a subprocess, with caches and results under ``tmp_path``."""
    env = {**os.environ, "LATA_CACHE": str(tmp_path / "cache"), "LATA_RESULTS": str(tmp_path / "results"),
           **(env_extra or {})}
    result = subprocess.run(LATA + args + [f"hydra.run.dir={run_dir or tmp_path / 'run'}", "progress=false"],
                            capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def family_args(d):
    """The command-line overrides naming a family written by ``write_family``."""
    return ["model=paths", f"++model.base={d['base']}", f"++model.instruct={d['instruct']}",
            *(f"++model.experts.{k}={v}" for k, v in d["experts"].items()), "benchmark=none"]


def engine_configs(options: dict):
    """(MergeConfig, WeightingConfig) from the flat options of ``reference.merge``: each method and
    weighting takes the keys its registry entry declares (``explicit`` is weighting.weights)."""
    from lata.config import MergeConfig, WeightingConfig
    from lata.methods import METHODS
    from lata.weightings import WEIGHTINGS

    method, name = options.get("method", "ta"), options.get("weighting", "uniform")
    merge = {k: options[k] for k in ("lam", "lams", "anchor", *METHODS.parameters(method)) if k in options}
    flat = {**options, "weights": options.get("explicit")}
    weighting = {k: flat[k] for k in ("normalize", "rest_weight", *WEIGHTINGS.parameters(name)) if k in flat}
    return MergeConfig(method=method, **merge), WeightingConfig(name=name, **weighting)


def recipe_weights(recipe, num_layers: int, model: str | None = None) -> list[float]:
    """One model's per-layer weights in a mergekit recipe, as ``weighting=explicit`` reads them
    (the file read once, at validation)."""
    from lata.config import WeightingConfig, validate_weighting

    part = validate_weighting(WeightingConfig(name="explicit", from_mergekit=str(recipe), mergekit_model=model))
    return part.weights_for([0.0] * num_layers)


def tiny_llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=48, max_position_embeddings=32, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def write_family(root: Path, experts=("math", "code"), dtype=torch.float32, seed=0, shard_size=None,
                 **config_overrides) -> dict:
    """base, instruct = base + instruction delta, expert_k = instruct + task delta (late layers larger)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(**config_overrides)
    base = LlamaForCausalLM(config).to(dtype)
    paths = {}

    def save(model, name):
        path = root / name
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(path, **kwargs)
        paths[name] = path

    save(base, "base")
    instruct_state = {k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()}
    instruct = LlamaForCausalLM(config).to(dtype)
    instruct.load_state_dict(instruct_state)
    save(instruct, "instruct")
    for i, name in enumerate(experts):
        state = {}
        for k, v in instruct_state.items():
            # task deltas grow with depth, and share some of the instruction direction early on
            layer = int(k.split(".")[2]) if k.startswith("model.layers.") else 0
            scale = 0.02 * (1 + layer)
            state[k] = v + scale * torch.randn_like(v) + (0.5 if layer < 2 else 0.0) * (v - base.state_dict()[k])
        model = LlamaForCausalLM(config).to(dtype)
        model.load_state_dict(state)
        save(model, name)
    return {"base": paths["base"], "instruct": paths["instruct"], "experts": {e: paths[e] for e in experts}}


def data_free_methods() -> list[str]:
    """The registered methods that need no calibration statistics (the data-aware ones, fisher
    and regmean, have their own tests: tests/test_data_aware.py)."""
    from lata.methods import METHODS

    return [m for m in METHODS.names() if METHODS.get(m).statistic is None]


def similarity_weightings() -> list[str]:
    """The registered weightings computed from the similarities alone (weighting=learned is
    learned by a run: tests/test_learned.py)."""
    from lata.weightings import WEIGHTINGS

    return [w for w in WEIGHTINGS.names() if not WEIGHTINGS.get(w).needs_learning]


CHARS = "abcdefghijklmnopqrstuvwxyz ?:."
#: one token per character, within tiny_llama_config's vocabulary
VOCAB = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *CHARS])}


def save_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (no merges, no special tokens added to a text)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab=VOCAB, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def write_family_with_tokenizer(root: Path) -> dict:
    """``write_family`` with the character-level tokenizer saved beside every checkpoint (for
    the passes that run the models: calibration, learned weights)."""
    dirs = write_family(root)
    for folder in [dirs["base"], dirs["instruct"], *dirs["experts"].values()]:
        save_tokenizer(folder)
    return dirs


@pytest.fixture
def family_dirs(tmp_path) -> dict:
    return write_family(tmp_path / "family")


@pytest.fixture(scope="session")
def wide_dirs(tmp_path_factory) -> dict:
    """A float32 family wide enough that its larger tensors span many slices of small chunk sizes."""
    return write_family(tmp_path_factory.mktemp("wide"), hidden_size=32, intermediate_size=96, vocab_size=200)


@pytest.fixture(scope="session")
def wide_bf16_dirs(tmp_path_factory) -> dict:
    """The same shape in bfloat16, its checkpoints in shards of 20 kB."""
    return write_family(tmp_path_factory.mktemp("wide-bf16"), dtype=torch.bfloat16, hidden_size=32,
                        intermediate_size=96, vocab_size=200, shard_size=20_000)


@pytest.fixture(scope="session")
def micro_zoo_cache(tmp_path_factory) -> Path:
    """A cache directory holding the built micro zoo (built once per test session)."""
    from lata.zoo import build_zoo, load_preset

    cache = tmp_path_factory.mktemp("zoo-cache")
    build_zoo(load_preset("micro"), cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def micro_zoo(micro_zoo_cache):
    """The micro zoo family (``lata.zoo.ZooFamily``), from ``micro_zoo_cache``."""
    from lata.zoo import build_zoo, load_preset

    return build_zoo(load_preset("micro"), micro_zoo_cache, progress=False)


def assert_every_path_gives_the_same_bits(plan, statistics=None) -> int:
    """The plan's merge sliced and threaded, staged (sliced or whole) and per whole tensor
    (``MergeMethod.delta``) gives the same bits; returns how many compared tensors span several
    37-value slices."""
    from lata import merge_state_dict
    from lata.accel.compute import pure_slice

    expected = merge_state_dict(plan)
    for options in (dict(chunk_size=37, threads=2), dict(staged=True, chunk_size=37), dict(staged=True)):
        got = merge_state_dict(plan.with_options(**options))
        for name in expected:
            assert torch.equal(got[name], expected[name]), (options, name)
    family, method, merged = plan.family, plan.method, 0
    anchor = family.anchor(plan.anchor)
    for name, value in expected.items():
        active = plan.active_experts(name)
        theta0 = anchor.get(name).float().reshape(-1)
        if not active:
            assert torch.equal(value.reshape(-1), theta0), name
            continue
        weights = [plan.weight(k, name) for k in active]
        scale = weights if method.scales_vectors else [1.0] * len(active)
        vectors = [pure_slice(family.experts[k].get(name).reshape(-1), theta0, w, "cpu").view(value.shape)
                   for k, w in zip(active, scale)]
        stats = None if plan.statistics is None else [plan.statistics[k].get(name) for k in active]
        whole = method.delta(vectors, [plan.lams[k] for k in active], active, name, weights=weights,
                             anchor=theta0.view(value.shape), statistics=stats).reshape(-1) + theta0
        assert torch.equal(value.reshape(-1), whole), name
        merged += int(value.numel() > 37)
    return merged
