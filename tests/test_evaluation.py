"""Benchmarks: offline data, task YAMLs through lm-eval, perplexity on known logits, code scoring."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from lata.evaluation.harness import context_length, evaluate, strided_perplexity
from lata.evaluation.scoring import is_refusal, process_math, score_code
from lata.evaluation.tasks import TASKS, DataPaths, export_gsm8k100, export_humaneval, render_tasks


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


@pytest.mark.parametrize("window, stride", [(16, 16), (16, 5), (64, 64), (7, 3)])
def test_strided_perplexity_of_a_uniform_model(window, stride):
    result = strided_perplexity(UniformLM(256), ByteTokenizer(), ["to be or not to be", "that is the question"],
                                window, stride)
    n = len("to be or not to be\n\nthat is the question")
    assert result["tokens"] == n - 1  # every token but the first is predicted exactly once
    assert result["token_perplexity"] == pytest.approx(256)
    assert result["nll"] == pytest.approx(math.log(256))


def test_offline_exports(tmp_path):
    humaneval = [json.loads(line) for line in export_humaneval(tmp_path).read_text().splitlines()]
    assert len(humaneval) == 164 and humaneval[0]["task_id"] == "HumanEval/0"
    gsm = [json.loads(line) for line in export_gsm8k100(tmp_path).read_text().splitlines()]
    assert len(gsm) == 100 and all("####" in g["answer"] for g in gsm)
    assert process_math(gsm[0], [gsm[0]["answer"]]) == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}


def test_every_canonical_humaneval_solution_passes_in_the_sandbox_and_wrong_ones_fail(tmp_path):
    problems = [json.loads(line) for line in export_humaneval(tmp_path).read_text().splitlines()]
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


def test_task_yamls_render_for_every_task_kind(tmp_path):
    zoo = tmp_path / "heldout"
    zoo.mkdir()
    for name in ("math", "code", "ua", "text"):
        (zoo / f"{name}.jsonl").write_text("{}\n")
    render_tasks(list(TASKS), tmp_path / "tasks", DataPaths(tmp_path / "data", zoo), num_fewshot=5, context=256)
    gsm = (tmp_path / "tasks" / "gsm8k.yaml").read_text()
    assert '"num_fewshot": 5' in gsm.replace("num_fewshot: 5", '"num_fewshot": 5')
    assert "process_results: !function lata_task_utils.process_math" in gsm
    assert '"max_gen_toks": 128' in (tmp_path / "tasks" / "humaneval_offline.yaml").read_text()
    assert "loglikelihood_rolling" in (tmp_path / "tasks" / "shakespeare_ppl.yaml").read_text()
    with pytest.raises(ValueError, match="unknown benchmark task 'gsm9k'"):
        render_tasks(["gsm9k"], tmp_path / "tasks", DataPaths(tmp_path))


def bench(**overrides):
    values = dict(tasks=[], limit=2, batch_size=4, num_fewshot=0, allow_code_execution=False, pass_k=[1],
                  code_samples=1, temperature=0.8, code_timeout_s=5.0, max_length=None, ppl_window=None, ppl_stride=64)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_code_tasks_need_the_opt_in_before_anything_runs(micro_zoo, tmp_path):
    from lata.evaluation.sandbox import CodeExecutionNotAllowed

    with pytest.raises(CodeExecutionNotAllowed, match="benchmark.allow_code_execution=true"):
        evaluate(None, None, bench(tasks=["zoo_code"]), tmp_path, tmp_path / "data", micro_zoo.heldout)
    assert not (tmp_path / "lm_eval_tasks").exists()


def test_offline_and_zoo_tasks_run_on_the_micro_zoo_through_lm_eval(micro_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_zoo.instruct).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.instruct)
    tasks = ["gsm8k_offline100", "humaneval_offline", "shakespeare_ppl", "zoo_math", "zoo_ua", "zoo_ppl"]
    metrics = evaluate(model, tokenizer, bench(tasks=tasks, allow_code_execution=True), tmp_path,
                       tmp_path / "data", micro_zoo.heldout)
    assert set(metrics) == set(tasks)
    assert all(m["samples"] == 2 for t, m in metrics.items() if t != "shakespeare_ppl")
    assert metrics["shakespeare_ppl"]["samples"] == 1  # one held-out play
    assert set(metrics["gsm8k_offline100"]) == {"exact_match_strict", "exact_match_flexible", "samples"}
    assert metrics["humaneval_offline"]["pass@1"] == 0.0  # a 1M-parameter model writes no working code
    ppl = metrics["zoo_ppl"]
    assert 1 < ppl["token_perplexity"] < 2048 and ppl["byte_perplexity"] > 1 and ppl["bits_per_byte"] > 0
    texts = [json.loads(line)["text"] for line in (micro_zoo.heldout / "text.jsonl").read_text().splitlines()[:2]]
    direct = strided_perplexity(model, tokenizer, texts, window=256, stride=64)
    assert ppl["token_perplexity"] == pytest.approx(direct["token_perplexity"])


def test_max_length_bounds_the_context_of_every_task(micro_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_zoo.instruct).eval()
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.instruct)
    limit = model.config.max_position_embeddings
    assert (context_length(model), context_length(model, 48), context_length(model, 10 * limit)) == (limit, 48, limit)
    metrics = evaluate(model, tokenizer, bench(tasks=["zoo_ppl", "humaneval_offline"], max_length=48,
                                               allow_code_execution=True, ppl_stride=16), tmp_path,
                       tmp_path / "data", micro_zoo.heldout)
    texts = [json.loads(line)["text"] for line in (micro_zoo.heldout / "text.jsonl").read_text().splitlines()[:2]]
    short = strided_perplexity(model, tokenizer, texts, window=48, stride=16)
    assert metrics["zoo_ppl"]["token_perplexity"] == pytest.approx(short["token_perplexity"])
    assert short["token_perplexity"] != pytest.approx(strided_perplexity(model, tokenizer, texts, 256, 16)["token_perplexity"])
    assert '"max_gen_toks": 24' in (tmp_path / "lm_eval_tasks" / "humaneval_offline.yaml").read_text()  # half of 48
