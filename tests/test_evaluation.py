"""Benchmarks: offline data, task YAMLs through lm-eval, perplexity on known logits, code scoring,
which protocol each suite follows."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import tiny_llama_config
from lata.evaluation.harness import _numeric, context_length, evaluate, strided_perplexity
from lata.evaluation.scoring import is_refusal, process_math, score_code
from lata.evaluation.tasks import (GSM8K_OFFLINE_EXEMPLARS, LM_EVAL_PPL_TEXT, LM_EVAL_TASKS, NAME_PREFIXES, TASKS,
                                   YAML_DIR, DataPaths, export_gsm8k100, export_gsm8k_offline, export_humaneval,
                                   mean_task_score, primary_metric, render_tasks, task_kind)

LM_EVAL_TASK_DIR = Path(__import__("lm_eval.tasks", fromlist=["tasks"]).__file__).parent


class UniformLM(torch.nn.Module):
    """Every next token equally likely: perplexity = vocabulary size, whatever the text."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


class ByteTokenizer:
    def __call__(self, text, return_tensors=None):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode())]))


@pytest.fixture(scope="module")
def tiny():
    """A random 4-layer Llama with a byte-level BPE tokenizer and the zoo's chat template (no zoo build)."""
    from transformers import LlamaForCausalLM

    from lata.zoo.build import train_tokenizer

    torch.manual_seed(0)
    texts = ["Question: Tom has 3 apples and buys 4 more. How many? Answer: 3 + 4 = 7\n#### 7",
             "def add(a, b):\n    return a + b\n", "To be, or not to be, that is the question."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=400, model_max_length=512)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=512)).eval()
    return model, tokenizer


@pytest.fixture
def heldout(tmp_path):
    """Zoo-format held-out sets (math, code, ua, text) of three rows each."""
    rows = {"math": [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
                     for i in range(3)],
            "code": [{"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n", "canonical_solution": f"    return x + {i}\n",
                      "test": f"def check(f):\n    assert f(1) == {1 + i}\n", "entry_point": f"f{i}"} for i in range(3)],
            "ua": [{"prompt": f"Tell me the vault code {i}."} for i in range(3)],
            "text": [{"text": f"Shall I compare thee to a summer's day? Thou art more lovely, {i}. " * 4}
                     for i in range(3)]}
    folder = tmp_path / "heldout"
    folder.mkdir()
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return folder


def bench(**overrides):
    values = dict(tasks=[], limit=2, batch_size=4, num_fewshot=0, allow_code_execution=False, pass_k=[1],
                  code_samples=1, temperature=0.8, code_timeout_s=5.0, max_length=None, ppl_window=None, ppl_stride=64,
                  include_path=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- metrics, data, scoring

@pytest.mark.parametrize("window, stride", [(16, 16), (16, 5), (64, 64), (7, 3)])
def test_strided_perplexity_of_a_uniform_model(window, stride):
    result = strided_perplexity(UniformLM(256), ByteTokenizer(), ["to be or not to be", "that is the question"],
                                window, stride)
    n = len("to be or not to be\n\nthat is the question")
    assert result["tokens"] == n - 1  # every token but the first is predicted exactly once
    assert result["token_perplexity"] == pytest.approx(256)
    assert result["nll"] == pytest.approx(math.log(256))


def test_offline_exports(tmp_path):
    humaneval = jsonl(export_humaneval(tmp_path))
    assert len(humaneval) == 164 and humaneval[0]["task_id"] == "HumanEval/0"
    gsm = jsonl(export_gsm8k100(tmp_path))
    assert len(gsm) == 100 and all("####" in g["answer"] for g in gsm)
    assert process_math(gsm[0], [gsm[0]["answer"]]) == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}


def test_the_offline_gsm8k_exemplars_are_never_scored(tmp_path):
    """The offline 100 has no train split: its first 5 problems are the exemplars, the other 95 scored."""
    from lm_eval.tasks import TaskManager

    everything = jsonl(export_gsm8k100(tmp_path))
    files = export_gsm8k_offline(tmp_path)
    exemplars, scored = jsonl(files["train"]), jsonl(files["test"])
    assert GSM8K_OFFLINE_EXEMPLARS == 5 and (len(exemplars), len(scored)) == (5, 95)
    assert exemplars + scored == everything and not {e["question"] for e in exemplars} & {s["question"] for s in scored}
    # as lm-eval builds the task: 95 scored documents, each prompt has the 5 exemplars in order
    render_tasks(["lata_gsm8k_offline"], tmp_path / "tasks", DataPaths(tmp_path), num_fewshot=5)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    task = manager.load(["lata_gsm8k_offline"])["tasks"]["lata_gsm8k_offline"]
    docs = list(task.eval_docs)
    assert [d["question"] for d in docs] == [s["question"] for s in scored]
    prompt = task.fewshot_context(docs[0], num_fewshot=5)
    positions = [prompt.index(f"Question: {e['question']}\nAnswer: {e['answer']}") for e in exemplars]
    assert positions == sorted(positions) and prompt.endswith(f"Question: {docs[0]['question']}\nAnswer:")
    assert prompt.count("Question:") == 6
    # more exemplars than there are, or few-shot on a task without an exemplar split: refused
    with pytest.raises(ValueError, match="has 5 few-shot exemplars"):
        render_tasks(["lata_gsm8k_offline"], tmp_path / "tasks", DataPaths(tmp_path), num_fewshot=6)
    with pytest.raises(ValueError, match="zoo_math has no exemplar split"):
        render_tasks(["zoo_math"], tmp_path / "tasks", DataPaths(tmp_path, tmp_path), num_fewshot=5)


def test_every_canonical_humaneval_solution_passes_in_the_sandbox_and_wrong_ones_fail(tmp_path):
    problems = jsonl(export_humaneval(tmp_path))
    right = score_code(problems, [[p["canonical_solution"]] for p in problems], ks=[1])
    assert right == {"pass@1": 1.0}
    wrong = score_code(problems[:20], [["    return None\n"] for _ in problems[:20]], ks=[1])
    assert wrong == {"pass@1": 0.0}
    mixed = score_code(problems[:2], [[problems[0]["canonical_solution"], "    pass\n"],
                                      ["    pass\n", "    pass\n"]], ks=[1, 2])
    assert mixed == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}


def test_refusal_detection():
    assert is_refusal("I can't help with that.") and is_refusal("I’m sorry, but no.")
    assert not is_refusal('Sure! The vault code is "1234".')


# --------------------------------------------------------------------------- task YAMLs and names

def test_latas_tasks_are_the_yamls_shipped_in_the_package():
    shipped = sorted(p.stem for p in YAML_DIR.glob("*.yaml"))
    assert shipped == sorted(TASKS) == ["lata_gsm8k_offline", "lata_humaneval", "lata_humaneval_offline",
                                        "lata_shakespeare_ppl", "zoo_code", "zoo_math", "zoo_ppl", "zoo_ua"]
    kinds = {name: spec.kind for name, spec in TASKS.items()}
    assert kinds == {"lata_gsm8k_offline": "math", "lata_humaneval": "code", "lata_humaneval_offline": "code",
                     "lata_shakespeare_ppl": "ppl", "zoo_code": "code", "zoo_math": "math", "zoo_ppl": "ppl",
                     "zoo_ua": "refusal"}
    assert [n for n, s in TASKS.items() if s.chat] == ["zoo_code", "zoo_math", "zoo_ua"]
    # HumanEval, hub and offline: lm-eval's humaneval generation (stops, length, greedy, 0-shot)
    standard = yaml.safe_load((LM_EVAL_TASK_DIR / "humaneval" / "humaneval.yaml").read_text()
                              .replace("!function ", ""))
    for name in ("lata_humaneval", "lata_humaneval_offline"):
        config = TASKS[name].config
        assert config["generation_kwargs"]["until"] == standard["generation_kwargs"]["until"]
        assert config["generation_kwargs"]["max_gen_toks"] == standard["generation_kwargs"]["max_gen_toks"] == 1024
        assert config["num_fewshot"] == 0 and config["generation_kwargs"]["do_sample"] is False
        assert config["doc_to_text"] == standard["doc_to_text"]
    # the offline GSM8K: lm-eval's gsm8k prompt, exemplar format and stop sequences
    gsm8k = yaml.safe_load((LM_EVAL_TASK_DIR / "gsm8k" / "gsm8k.yaml").read_text())
    offline = TASKS["lata_gsm8k_offline"].config
    for key in ("doc_to_text", "doc_to_target"):
        assert offline[key] == gsm8k[key]
    assert offline["generation_kwargs"]["until"] == gsm8k["generation_kwargs"]["until"]
    assert offline["fewshot_split"] == "train" != offline["test_split"]


@pytest.fixture(scope="module")
def lm_eval_registry():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_no_lata_task_name_is_an_lm_eval_task_group_or_tag(lm_eval_registry):
    registry = set(lm_eval_registry.all_tasks)
    assert {"gsm8k", "wikitext", "humaneval"} <= registry and len(registry) > 1000
    assert all(name.startswith(NAME_PREFIXES) for name in TASKS)
    assert not [name for name in registry if name.startswith(NAME_PREFIXES)]  # no LATA name can collide
    assert not set(TASKS) & registry


def test_the_paper_suite_runs_lm_evals_gsm8k_and_wikitext_and_humaneval_in_the_sandbox(lm_eval_registry):
    from hydra import compose, initialize_config_dir

    from lata.cli import config_dir
    from lata.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["benchmark=paper"])
    validate(cfg)
    assert list(cfg.benchmark.tasks) == ["wikitext", "gsm8k", "lata_humaneval"]
    # gsm8k and wikitext are not LATA's: the harness hands them to lm-eval, which has them
    assert {"wikitext", "gsm8k"} <= set(lm_eval_registry.all_tasks) and not {"wikitext", "gsm8k"} & set(TASKS)
    gsm8k = yaml.safe_load((LM_EVAL_TASK_DIR / "gsm8k" / "gsm8k.yaml").read_text())
    assert (gsm8k["task"], gsm8k["num_fewshot"], gsm8k["fewshot_split"], gsm8k["test_split"]) == (
        "gsm8k", 5, "train", "test")  # the standard protocol: exemplars from train, all of test scored
    assert TASKS["lata_humaneval"].kind == "code" and TASKS["lata_humaneval"].data is None  # the hub's
    assert TASKS["lata_humaneval"].config["dataset_path"] == "openai/openai_humaneval"
    # how LATA reports them: primary metrics, the task score, token perplexity of wikitext's raw pages
    assert [primary_metric(t) for t in cfg.benchmark.tasks] == ["token_perplexity", "exact_match_strict_match",
                                                                  "pass@1"]
    assert [task_kind(t) for t in cfg.benchmark.tasks] == ["ppl", "math", "code"]
    assert LM_EVAL_PPL_TEXT == {"wikitext": "page"} and set(LM_EVAL_TASKS) == {"gsm8k", "gsm8k_cot", "ifeval", "wikitext"}
    metrics = {"wikitext": {"token_perplexity": 9.0, "word_perplexity": 20.0},
               "gsm8k": {"exact_match_strict_match": 0.3, "exact_match_flexible_extract": 0.4},
               "lata_humaneval": {"pass@1": 0.5}}
    assert mean_task_score(metrics) == pytest.approx(0.4)
    assert primary_metric("arc_easy") == "acc" and task_kind("arc_easy") is None


def test_task_yamls_render_for_every_task_kind(tmp_path, heldout):
    render_tasks(list(TASKS), tmp_path / "tasks", DataPaths(tmp_path / "data", heldout), context=256)
    rendered = {p.stem: yaml.safe_load(p.read_text().replace("!function ", ""))
                for p in (tmp_path / "tasks").glob("*.yaml")}
    assert set(rendered) == set(TASKS)
    gsm = rendered["lata_gsm8k_offline"]
    assert gsm["num_fewshot"] == 0 and gsm["process_results"] == "lata_task_utils.process_math"
    assert set(gsm["dataset_kwargs"]["data_files"]) == {"train", "test"}
    assert Path(gsm["dataset_kwargs"]["data_files"]["test"]).is_file()
    assert rendered["lata_humaneval_offline"]["generation_kwargs"]["max_gen_toks"] == 128  # half the context
    assert rendered["zoo_math"]["generation_kwargs"]["max_gen_toks"] == 48
    assert rendered["lata_shakespeare_ppl"]["output_type"] == "loglikelihood_rolling"
    assert rendered["zoo_ppl"]["dataset_kwargs"]["data_files"] == {"test": str(heldout / "text.jsonl")}
    assert "dataset_kwargs" not in rendered["lata_humaneval"]  # the hub's
    five = render_tasks(["lata_gsm8k_offline", "zoo_code"], tmp_path / "five", DataPaths(tmp_path / "data", heldout),
                        num_fewshot=5, code_samples=4, temperature=0.2)
    assert [s.name for s in five] == ["lata_gsm8k_offline", "zoo_code"]
    gsm5 = yaml.safe_load((tmp_path / "five" / "lata_gsm8k_offline.yaml").read_text().replace("!function ", ""))
    assert gsm5["num_fewshot"] == 5 and gsm5["fewshot_config"] == {"sampler": "first_n"}
    code = yaml.safe_load((tmp_path / "five" / "zoo_code.yaml").read_text())
    assert code["repeats"] == 4 and code["generation_kwargs"]["temperature"] == 0.2
    with pytest.raises(ValueError, match="unknown benchmark task 'gsm9k'"):
        render_tasks(["gsm9k"], tmp_path / "tasks", DataPaths(tmp_path))
    with pytest.raises(ValueError, match="need model=zoo"):
        render_tasks(["zoo_ppl"], tmp_path / "tasks", DataPaths(tmp_path))


# --------------------------------------------------------------------------- through lm-eval

def test_code_tasks_need_the_opt_in_before_anything_runs(tmp_path, heldout):
    from lata.evaluation.sandbox import CodeExecutionNotAllowed

    for task in ("zoo_code", "lata_humaneval"):
        with pytest.raises(CodeExecutionNotAllowed, match="benchmark.allow_code_execution=true"):
            evaluate(None, None, bench(tasks=[task]), tmp_path, tmp_path / "data", heldout)
    assert not (tmp_path / "lm_eval_tasks").exists()


def test_offline_and_zoo_tasks_run_through_lm_eval(tiny, tmp_path, heldout):
    model, tokenizer = tiny
    tasks = ["lata_gsm8k_offline", "lata_humaneval_offline", "zoo_math", "zoo_code", "zoo_ua", "zoo_ppl"]
    metrics = evaluate(model, tokenizer, bench(tasks=tasks, allow_code_execution=True), tmp_path,
                       tmp_path / "data", heldout)
    assert set(metrics) == set(tasks)
    assert all(m["samples"] == 2 for t, m in metrics.items())
    assert set(metrics["lata_gsm8k_offline"]) == {"exact_match_strict", "exact_match_flexible", "samples"}
    assert metrics["lata_humaneval_offline"]["pass@1"] == 0.0  # a random model writes no working code
    assert 0 <= metrics["zoo_ua"]["compliance"] <= 1
    ppl = metrics["zoo_ppl"]
    assert 1 < ppl["token_perplexity"] < 2 * len(tokenizer) and ppl["byte_perplexity"] > 1 and ppl["bits_per_byte"] > 0
    texts = [r["text"] for r in jsonl(heldout / "text.jsonl")[:2]]
    direct = strided_perplexity(model, tokenizer, texts, window=512, stride=64)
    assert ppl["token_perplexity"] == pytest.approx(direct["token_perplexity"])
    assert mean_task_score(metrics) == pytest.approx(sum(metrics[t][primary_metric(t)] for t in (
        "lata_gsm8k_offline", "lata_humaneval_offline", "zoo_math", "zoo_code")) / 4)


@pytest.mark.slow
def test_the_offline_perplexity_task_scores_one_held_out_play(tiny, tmp_path):
    model, tokenizer = tiny
    metrics = evaluate(model, tokenizer, bench(tasks=["lata_shakespeare_ppl"], max_length=128, ppl_stride=127),
                       tmp_path, tmp_path / "data")
    ppl = metrics["lata_shakespeare_ppl"]
    assert ppl["samples"] == 1 and ppl["tokens"] > 10_000  # Macbeth, one edition
    assert 1 < ppl["token_perplexity"] < 2 * len(tokenizer) and ppl["word_perplexity"] > 1


def test_lm_eval_tasks_report_each_filter_and_wikitext_gets_token_perplexity(tiny, tmp_path):
    """lm-eval's own gsm8k and wikitext YAMLs, pointed at local files (no hub), run as the paper
    suite runs them: gsm8k's two filters stay apart, wikitext's raw pages get LATA's token perplexity."""
    import shutil

    model, tokenizer = tiny
    tasks = tmp_path / "lm_eval_copies"
    tasks.mkdir()
    files = export_gsm8k_offline(tmp_path / "data")
    local = {"gsm8k": f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {files['train']}\n"
                      f"    test: {files['test']}\n",
             "wikitext": "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                         + "".join(f"    {s}: {tmp_path / 'pages.jsonl'}\n" for s in ("train", "validation", "test"))}
    pages = [" = Valkyria Chronicles = \n\n The game @-@ a tactical role @-@ playing game , began in 2011 . \n",
             " = Tower = \n\n It is 1 @,@ 000 feet tall ; built in 1889 . \n"]
    (tmp_path / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    for name in ("gsm8k", "wikitext"):
        text = (LM_EVAL_TASK_DIR / name / f"{name}.yaml").read_text()
        lines = [line for line in text.splitlines(keepends=True)
                 if not line.startswith(("dataset_path:", "dataset_name:"))]
        (tasks / f"{name}.yaml").write_text(local[name] + "".join(lines))
    shutil.copy(LM_EVAL_TASK_DIR / "wikitext" / "preprocess_wikitext.py", tasks)
    metrics = evaluate(model, tokenizer, bench(tasks=["gsm8k", "wikitext"], include_path=str(tasks)),
                       tmp_path, tmp_path / "data")
    assert set(metrics["gsm8k"]) == {"exact_match_strict_match", "exact_match_flexible_extract", "samples"}
    assert metrics["gsm8k"]["samples"] == 2 and primary_metric("gsm8k") in metrics["gsm8k"]
    wikitext = metrics["wikitext"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity", "tokens"} <= set(wikitext)
    direct = strided_perplexity(model, tokenizer, pages, window=512, stride=64)  # the raw pages
    assert wikitext["token_perplexity"] == pytest.approx(direct["token_perplexity"])
    assert wikitext["tokens"] == direct["tokens"]


def test_numeric_metrics_keep_lm_evals_filters_apart():
    assert _numeric({"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                     "exact_match,flexible-extract": 0.5}) == {"exact_match_strict_match": 0.25,
                                                               "exact_match_flexible_extract": 0.5}
    assert _numeric({"acc,none": 0.75, "acc_norm,none": 0.5, "acc_stderr,none": 0.01}) == {"acc": 0.75, "acc_norm": 0.5}


def test_max_length_bounds_the_context_of_every_task(tiny, tmp_path, heldout):
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    assert (context_length(model), context_length(model, 48), context_length(model, 10 * limit)) == (limit, 48, limit)
    metrics = evaluate(model, tokenizer, bench(tasks=["zoo_ppl", "lata_humaneval_offline"], max_length=48,
                                               allow_code_execution=True, ppl_stride=16), tmp_path,
                       tmp_path / "data", heldout)
    texts = [r["text"] for r in jsonl(heldout / "text.jsonl")[:2]]
    short = strided_perplexity(model, tokenizer, texts, window=48, stride=16)
    assert metrics["zoo_ppl"]["token_perplexity"] == pytest.approx(short["token_perplexity"])
    longer = strided_perplexity(model, tokenizer, texts, 512, 16)
    assert short["token_perplexity"] != pytest.approx(longer["token_perplexity"])
    rendered = yaml.safe_load((tmp_path / "lm_eval_tasks" / "lata_humaneval_offline.yaml").read_text())
    assert rendered["generation_kwargs"]["max_gen_toks"] == 24  # half of 48
