"""A merged checkpoint serves other tools: lm-eval's own command (not LATA's harness) loads a
merged Llama directory, with the tokenizer the merge copied, and scores a local multiple-choice
task; its loglikelihoods and accuracy are those the test computes from the merge itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, save_tokenizer, write_family
from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, merge_to_dir, plan_merge

WORDS = ["cat", "dog", "sun", "sea", "red", "tree", "bird", "fish"]
DOCS = 16
LIMIT = 12  # lm-eval scores the first LIMIT documents


def lm_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lm_eval")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]


def documents() -> list[dict]:
    """Questions of two words and "is", three one-word choices, a gold index (fixed, not random)."""
    return [{"question": f"{WORDS[i % 8]} {WORDS[(3 * i + i // 8 + 1) % 8]} is",
             "choices": [WORDS[(i + 2) % 8], WORDS[(i + 5) % 8], WORDS[(5 * i + 3) % 8]], "answer": i % 3}
            for i in range(DOCS)]


def write_task(folder: Path, data: Path) -> None:
    folder.mkdir(parents=True)
    data.write_text("".join(json.dumps(d) + "\n" for d in documents()))
    (folder / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")


@torch.no_grad()
def loglikelihoods(model, doc: dict) -> list[float]:
    """log P(" " + choice | question) for each choice, from the model's logits (lm-eval's target
    delimiter is a space; with one token per character the pair tokenizes as its concatenation)."""
    out = []
    for choice in doc["choices"]:
        context, continuation = [VOCAB[c] for c in doc["question"]], [VOCAB[c] for c in " " + choice]
        ids = torch.tensor([context + continuation])
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        out.append(sum(float(logprobs[len(context) + i - 1, token]) for i, token in enumerate(continuation)))
    return out


def model_of(state: dict, folder: Path) -> LlamaForCausalLM:
    """A float32 Llama of ``folder``'s config holding ``state``."""
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(folder))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


@pytest.mark.slow
def test_lm_eval_s_command_scores_a_merged_checkpoint_as_the_merge_predicts(tmp_path):
    dirs = write_family(tmp_path / "family", max_position_embeddings=64)
    for folder in [dirs["base"], dirs["instruct"], *dirs["experts"].values()]:
        save_tokenizer(folder)
    plan = plan_merge(Family.open(dirs["base"], dirs["instruct"], dirs["experts"]),
                      MergeConfig(method="ties", density=0.5, lam=0.8), WeightingConfig(name="linear_rank"))
    merged = merge_to_dir(plan, tmp_path / "merged", progress=False)
    assert (merged / "tokenizer.json").is_file() and (merged / "tokenizer_config.json").is_file()

    write_task(tmp_path / "tasks", tmp_path / "docs.jsonl")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(lm_eval_command() + [
        "--model", "hf", "--model_args", f"pretrained={merged},dtype=float32", "--tasks", "tiny_choice",
        "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--limit", str(LIMIT),
        "--output_path", str(tmp_path / "out"), "--log_samples"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    [samples_file] = (tmp_path / "out").rglob("samples_tiny_choice_*.jsonl")
    scored = json.loads(results_file.read_text())["results"]["tiny_choice"]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert scored["sample_len"] == LIMIT and [s["doc_id"] for s in samples] == list(range(LIMIT))

    # the same numbers from the merge in memory and the documents as written, without lm-eval
    reference = model_of(merge_state_dict(plan), merged)
    anchor = LlamaForCausalLM.from_pretrained(dirs["instruct"]).float().eval()  # merge.anchor: instruct
    docs = documents()[:LIMIT]
    ours = [loglikelihoods(reference, d) for d in docs]
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert len(theirs) == len(ours) and all(len(x) == 3 for x in theirs)
    assert sum(theirs, []) == pytest.approx(sum(ours, []), abs=1e-4)
    accuracy = sum(max(range(3), key=lls.__getitem__) == d["answer"] for lls, d in zip(ours, docs)) / LIMIT
    assert 0.0 <= scored["acc,none"] <= 1.0 and scored["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    # ... and not those of the model the merge started from
    unmerged = [loglikelihoods(anchor, d) for d in docs]
    assert max(abs(a - b) for a, b in zip(sum(theirs, []), sum(unmerged, []))) > 1e-2
