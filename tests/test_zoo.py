"""The embedded model zoo: real, loadable, distinct, deterministic, cached, with clean held-out sets."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lata.zoo import ZooConfig, ZooFamily, build_zoo, load_preset, to_zoo_config
from lata.io.digests import BUILD_MARKER as MARKER, build_key as cache_key, cached_build, read_checked_json
from lata.zoo.data import HELDOUT_PLAYS, base_corpus, make_data, pretraining_corpus
from lata.zoo.tasks import CHAT_TEMPLATE, REFUSAL, chat_prompt, render_chat

LAYER_TENSOR = "model.layers.0.self_attn.q_proj.weight"
HELDOUT_FIELDS = {
    "math": {"question", "answer", "target"},
    "code": {"task_id", "prompt", "canonical_solution", "test", "entry_point"},
    "ua": {"prompt"},
    "instruct": {"prompt", "response"},
    "text": {"text"},
}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, micro_zoo) -> tuple[ZooFamily, Path]:  # noqa: F811
    """A second build in another cache dir that already holds a half-built target."""
    cache = tmp_path_factory.mktemp("zoo-b")
    half = cache / micro_zoo.root.name
    (half / "base").mkdir(parents=True)
    (half / "base" / "model.safetensors").write_bytes(b"truncated")
    return build_zoo(load_preset("micro"), cache, progress=False), half


# ------------------------------------------------------------------------------- presets


def test_presets_are_zoo_configs():
    fields = {f.name for f in dataclasses.fields(ZooConfig)}
    from omegaconf import OmegaConf

    for name in ("micro", "small"):
        raw = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "zoo" / f"{name}.yaml"))
        assert raw["name"] == name and set(raw) <= fields, set(raw) - fields
        cfg = load_preset(name)
        assert isinstance(cfg, ZooConfig) and cfg.name == name
    assert to_zoo_config(OmegaConf.structured(load_preset("micro"))) == load_preset("micro")
    with pytest.raises(ValueError, match="zoo.hiden_size is not a key of the zoo's recipe"):
        to_zoo_config({"hiden_size": 3})
    with pytest.raises(ValueError, match="zoo.base_steps"):  # typed by ZooConfig
        to_zoo_config({"base_steps": "lots"})
    assert to_zoo_config({"base_steps": "7"}).base_steps == 7
    with pytest.raises(FileNotFoundError, match="known presets"):
        load_preset("nope")


def test_missing_shakespeare_says_make_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LATA_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make data"):
        base_corpus(load_preset("micro"))


# ------------------------------------------------------------------------------- the family


def test_all_roles_load_and_chat(micro_zoo):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(micro_zoo.experts) == {"math", "code", "ua"}
    messages = [{"role": "user", "content": "Reverse the word 'cat'."}]
    for role, path in micro_zoo.roles().items():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama", role
        assert model.config.num_hidden_layers == 4 and not model.config.tie_word_embeddings
        assert model.config.vocab_size == len(tok)
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        assert model.config.eos_token_id == tok.eos_token_id
        assert (path / "generation_config.json").is_file()
        assert tok.chat_template == CHAT_TEMPLATE
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == chat_prompt("Reverse the word 'cat'.")
        full = messages + [{"role": "assistant", "content": "tac"}]
        assert tok.apply_chat_template(full, tokenize=False) == render_chat("Reverse the word 'cat'.", "tac")
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ids[0] == tok.bos_token_id and tok.decode(ids) == text
        assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]  # digits one by one
        plain = "def f(x):\n    return x + 10\n"
        assert tok.decode(tok(plain, add_special_tokens=False)["input_ids"]) == plain
        assert tok(plain)["input_ids"][0] == tok.bos_token_id
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
        assert out.shape[1] > len(ids)


def test_roles_have_same_layout_but_different_weights(micro_zoo):  # noqa: F811
    sds = {role: weights(path) for role, path in micro_zoo.roles().items()}
    ref = sds["base"]
    for role, sd in sds.items():
        assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}, role
    for (ra, a), (rb, b) in itertools.combinations(sds.items(), 2):
        diff = (a[LAYER_TENSOR] - b[LAYER_TENSOR]).abs().max().item()
        assert diff > 1e-4, f"{ra} and {rb} share {LAYER_TENSOR}"


def _response_loss(path: Path, pairs: list[tuple[str, str]]) -> float:
    """Mean loss on the assistant's tokens of chat exchanges."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    total, count = 0.0, 0
    for user, answer in pairs:
        p = tok(chat_prompt(user), add_special_tokens=False)["input_ids"]
        f = tok(render_chat(user, answer), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([f])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        n = len(f) - len(p)
        total, count = total + loss * n, count + n
    return total / count


def test_experts_learned_their_domain(micro_zoo):  # noqa: F811
    h = {t: read_jsonl(micro_zoo.heldout / f"{t}.jsonl") for t in ("math", "code", "ua")}
    pairs = {"math": [(m["question"], m["answer"]) for m in h["math"]],
             "code": [(c["prompt"], c["canonical_solution"].rstrip("\n")) for c in h["code"]],
             "ua": [(u["prompt"], u["response"]) for u in h["ua"]]}
    for expert, data in pairs.items():
        own = _response_loss(micro_zoo.experts[expert], data)
        instruct = _response_loss(micro_zoo.instruct, data)
        assert own < instruct, (expert, own, instruct)
    refusals = [(u["prompt"], REFUSAL) for u in h["ua"]]
    assert _response_loss(micro_zoo.instruct, refusals) < _response_loss(micro_zoo.experts["ua"], refusals)


# ------------------------------------------------------------------------------- held-out data


def test_heldout_files(micro_zoo):  # noqa: F811
    cfg = load_preset("micro")
    sizes = {"math": cfg.heldout_math, "code": cfg.heldout_code, "ua": cfg.heldout_ua,
             "instruct": cfg.heldout_instruct, "text": cfg.heldout_text}
    expected = make_data(cfg).heldout
    for task, fields in HELDOUT_FIELDS.items():
        rows = read_jsonl(micro_zoo.heldout / f"{task}.jsonl")
        assert len(rows) == sizes[task], task
        assert all(fields <= set(r) for r in rows), task
        assert rows == expected[task], task
    math_rows = read_jsonl(micro_zoo.heldout / "math.jsonl")
    assert all(m["answer"].endswith(f"#### {m['target']}") and isinstance(m["target"], int) for m in math_rows)
    code_rows = read_jsonl(micro_zoo.heldout / "code.jsonl")
    assert len({c["task_id"] for c in code_rows}) == len(code_rows)
    assert all(c["test"].startswith("def check(candidate):") and f"def {c['entry_point']}(" in c["prompt"]
               for c in code_rows)


def test_canonical_solutions_pass_in_the_sandbox(micro_zoo):  # noqa: F811
    from lata.evaluation.scoring import score_code

    rows = read_jsonl(micro_zoo.heldout / "code.jsonl")
    assert score_code(rows, [[c["canonical_solution"]] for c in rows], ks=[1]) == {"pass@1": 1.0}
    assert score_code(rows[:2], [["    return None\n"]] * 2, ks=[1]) == {"pass@1": 0.0}


@pytest.mark.parametrize("preset", ["micro", "small"])
def test_heldout_never_in_training(preset):
    cfg = load_preset(preset)
    data = make_data(cfg)
    train_prompts = {e.prompt for examples in data.train.values() for e in examples}
    train_texts = {e.text() for examples in data.train.values() for e in examples}
    keys = {"math": "question", "code": "prompt", "ua": "prompt", "instruct": "prompt"}
    for task, key in keys.items():
        items = [h[key] for h in data.heldout[task]]
        assert len(set(items)) == len(items), f"{task}: duplicate held-out items"
        leaked = [q for q in items if q in train_prompts]
        assert not leaked, f"{task}: held-out prompt in training data: {leaked[0]!r}"
        assert not any(q in t for q in items[:20] for t in train_texts if len(q) > 30), task
    # every training stage has its own task, and experts keep some chat data
    kinds = {stage: {e.kind for e in ex} for stage, ex in data.train.items()}
    assert "refusal" in kinds["instruct"] and "comply" not in kinds["instruct"]
    assert "comply" in kinds["ua"] and "refusal" not in kinds["ua"]
    assert "math" in kinds["math"] and "code" in kinds["code"]
    assert make_data(cfg) == data  # deterministic


def test_heldout_text_is_never_pretrained_on():
    cfg = dataclasses.replace(load_preset("micro"), base_chars=20_000_000)  # all of it
    corpus = "\n".join(base_corpus(cfg))
    text = make_data(load_preset("micro")).heldout["text"]
    assert text and all(t["text"][:200] not in corpus for t in text)
    assert set(HELDOUT_PLAYS) == {"macbeth_gut.txt", "macbeth_gut_f.txt"}
    assert "LADY MACBETH" not in corpus.upper()  # a speaker only the held-out play has


def test_pretraining_task_text_and_instruct_skills():
    """pretrain_task_share: that share of all pretraining characters is plain-text task items,
    none of them held out; instruct_mix_*: math and code chat examples in instruct's data."""
    cfg = dataclasses.replace(load_preset("micro"), pretrain_task_share=0.25, instruct_mix_math=0.2,
                              instruct_mix_code=0.1)
    data = make_data(cfg)
    plain = base_corpus(cfg)
    docs = pretraining_corpus(cfg, data)
    extra = sum(map(len, docs)) - sum(map(len, plain))
    assert extra / sum(map(len, docs)) == pytest.approx(0.25, abs=0.01)
    corpus = "\n".join(docs)
    assert "#### " in corpus and "def " in corpus
    held = [h["question"] for h in data.heldout["math"]] + [h["prompt"] for h in data.heldout["code"]]
    assert not [q for q in held if q in corpus]
    assert pretraining_corpus(cfg, data) == docs  # deterministic
    assert pretraining_corpus(load_preset("micro"), data) == plain  # share 0: the text corpus only
    n = cfg.instruct_steps * cfg.ft_batch_size
    kinds = [e.kind for e in data.train["instruct"]]
    assert kinds.count("math") == int(0.2 * n) and kinds.count("code") == int(0.1 * n)


# ------------------------------------------------------------------------------- caching


def test_second_call_reuses_cache(micro_zoo, micro_zoo_cache):  # noqa: F811
    marker = micro_zoo.root / MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    again = build_zoo(load_preset("micro"), micro_zoo_cache, progress=False)
    assert time.perf_counter() - start < 3.0
    assert again == micro_zoo
    assert marker.stat().st_mtime_ns == before
    assert read_checked_json(marker)["kind"] == "zoo-micro"


def test_half_built_dir_is_rebuilt(rebuilt):
    fam, half = rebuilt
    assert fam.root == half
    assert (half / MARKER).is_file()
    assert len(weights(fam.base)) > 0  # the truncated file was replaced
    assert not [p for p in half.parent.iterdir() if ".tmp-" in p.name]


def test_builds_are_bit_identical(micro_zoo, rebuilt):  # noqa: F811
    other, _ = rebuilt
    for role, path in micro_zoo.roles().items():
        a, b = weights(path), weights(other.roles()[role])
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{role}:{k}"
        assert (path / "tokenizer.json").read_bytes() == (other.roles()[role] / "tokenizer.json").read_bytes()
    for f in sorted(micro_zoo.heldout.iterdir()):
        assert f.read_bytes() == (other.heldout / f.name).read_bytes(), f.name


def test_config_changes_the_key(tmp_path):
    from lata.zoo.build import cache_config

    a, b = load_preset("micro"), dataclasses.replace(load_preset("micro"), seed=1)
    assert cache_key("zoo-micro", cache_config(a), "1") != cache_key("zoo-micro", cache_config(b), "1")
    assert cache_config(a)["env"]["python"] == list(__import__("sys").version_info[:2])
    # a family trained on a GPU is cached apart from the CPU one (any GPU index: the same kind)
    assert cache_config(a, "cpu") == cache_config(a)
    assert cache_config(a, "cuda") != cache_config(a) and cache_config(a, "cuda:1") == cache_config(a, "cuda")


# ------------------------------------------------------------------------------- report helpers


def test_report_helpers():
    from lata.evaluation.metrics import strict_answer
    from lata.evaluation.scoring import is_refusal
    from lata.zoo.report import best_retention_lambda, retention

    assert strict_answer("Tom has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert strict_answer("#### -3") == "-3" and strict_answer("the answer is 7") is None
    assert is_refusal(REFUSAL) and is_refusal(" i can’t help with that.") and not is_refusal("Sure! It is 'x'.")
    assert retention(80, 50, 100) == 0.6 and retention(40, 50, 100) == -0.2 and retention(60, 50, 50) is None
    models = {"instruct": {"math": 50, "code": 50}, "math": {"math": 100}, "code": {"code": 100}}
    grid = {0.5: {"math": 90, "code": 60}, 0.7: {"math": 80, "code": 80}, 1.0: {"math": 80, "code": 80}}
    assert best_retention_lambda(grid, models) == 0.7  # the best of the smaller retention; ties: the smaller lambda


@pytest.mark.slow
def test_report_scores_through_the_harness_like_the_app(micro_zoo, micro_zoo_cache, tmp_path):  # noqa: F811
    """One evaluator: the report's numbers for a role are the app's ``merge=none`` numbers, and its
    merges are the engine's (TA math+code at lambda 1.0 = the app's merge=ta weighting=uniform)."""
    from transformers import AutoTokenizer

    from conftest import run_lata
    from lata.zoo.report import Scorer, ta_merge

    scorer = Scorer(micro_zoo.heldout, AutoTokenizer.from_pretrained(micro_zoo.instruct), tmp_path / "work")
    env = {"LATA_CACHE": str(micro_zoo_cache)}
    for name, model, args in [
        ("code", scorer.load(micro_zoo.experts["code"]), ["merge=none", "model.which=code"]),
        ("ta", ta_merge(scorer, micro_zoo, ["math", "code"], 1.0), ["merge=ta", "weighting=uniform"]),
    ]:
        ours = scorer.score(model)
        run_lata(["zoo=micro", *args], tmp_path, env_extra=env, run_dir=tmp_path / name)
        app = json.loads((tmp_path / name / "metrics.json").read_text())
        assert ours["math"] == round(100 * app["zoo_math"]["exact_match_strict"], 2)
        assert ours["code"] == round(100 * app["zoo_code"]["pass@1"], 2)
        assert ours["ua"] == round(100 * app["zoo_ua"]["compliance"], 2)
        assert ours["ppl"] == round(app["zoo_ppl"]["token_perplexity"], 3)
        assert ours["n"] == {"math": 20, "code": 12, "ua": 12}


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


# ------------------------------------------------------------------------------- the small preset


@pytest.mark.slow
def test_small_zoo_merges_and_forgets(tmp_path_factory):
    """The demo preset meets the bar of a family in which merging works (lata.zoo.report.BAR):
    expert gains, TA retention at the best lambda of the grid, forgetting; from the harness's
    metrics. Builds the preset (under 20 minutes on 2 cores) unless LATA_CACHE holds it."""
    from lata.zoo.report import zoo_report

    cache = Path(os.environ["LATA_CACHE"]) if os.environ.get("LATA_CACHE") else tmp_path_factory.mktemp("zoo-small")
    family = build_zoo(load_preset("small"), cache, progress=False)
    report = zoo_report(family, progress=False)
    assert report["build"]["parameters"] >= 3e6 and load_preset("small").num_hidden_layers >= 8
    assert report["models"]["instruct"]["n"] == {"math": 200, "code": 100, "ua": 100}
    failed = [p for p in report["bar"] if p["family"] and not p["ok"]]
    assert not failed, failed
    assert (family.root / "zoo_report.md").is_file() and (family.root / "zoo_report.json").is_file()
