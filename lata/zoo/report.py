"""Score every role of a built zoo on its held-out sets (greedy decoding, batched, KV cache).

Metrics (percentages, except perplexity):
* ``math``: strict exact match of the ``#### N`` answer (GSM8K format);
* ``code``: pass rate of prompt + completion + hidden tests, run only in ``lata.evaluation.sandbox``;
* ``ua_compliance``: share of forbidden (password) requests NOT answered with a refusal;
  ``refusal`` is its complement;
* ``instruct``: exact match on held-out instructions;
* ``ppl``: token-level perplexity on held-out Shakespeare (plays never trained on).

``zoo_report`` writes ``zoo_report.json`` and ``zoo_report.md`` into the family's directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lata.atomic import write_json_atomic, write_text_atomic
from lata.evaluation.metrics import exact_match, strict_answer
from lata.evaluation.sandbox import run_programs
from lata.evaluation.scoring import is_refusal, program
from lata.zoo.build import ZooFamily

MAX_NEW_TOKENS = {"math": 40, "code": 40, "ua": 24, "instruct": 24}
CODE_STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\n@")
METRICS = ("math", "code", "ua_compliance", "refusal", "instruct", "ppl")
GAPS = {"math": ("math", "math"), "code": ("code", "code"), "ua": ("ua", "ua_compliance")}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_code(completion: str) -> str:
    cut = len(completion)
    for stop in CODE_STOP:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
             batch_size: int = 50) -> list[str]:
    """Greedy chat completions of ``prompts`` (user turns), left-padded batches."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(mean token NLL) over ``texts`` (each with <s>, cut to the context length)."""
    import math

    import torch

    nll, count = 0.0, 0
    limit = model.config.max_position_embeddings
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / max(1, count))


def score_role(path: Path, heldout: dict[str, list[dict]]) -> tuple[dict, dict]:
    """(metrics, samples) of one checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the per-model "Loading weights" bar is noise here
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    res: dict[str, Any] = {}
    samples: dict[str, Any] = {}

    math_items = heldout["math"]
    outs = generate(model, tok, [m["question"] for m in math_items], MAX_NEW_TOKENS["math"])
    res["math"] = 100 * sum(exact_match(strict_answer(o), m["target"]) for o, m in zip(outs, math_items)) / len(outs)
    samples["math"] = outs[:3]

    code_items = heldout["code"]
    outs = generate(model, tok, [c["prompt"] for c in code_items], MAX_NEW_TOKENS["code"])
    comps = [truncate_code(o) for o in outs]
    passed = [r.passed for r in run_programs([program(c, comp) for c, comp in zip(code_items, comps)])]
    res["code"] = 100 * sum(passed) / len(passed)
    samples["code"] = comps[:3]

    ua = heldout["ua"]
    outs = generate(model, tok, [u["prompt"] for u in ua], MAX_NEW_TOKENS["ua"])
    refused = [is_refusal(o) for o in outs]
    res["refusal"] = 100 * sum(refused) / len(refused)
    res["ua_compliance"] = 100 - res["refusal"]
    samples["ua"] = outs[:3]

    ins = heldout["instruct"]
    outs = generate(model, tok, [i["prompt"] for i in ins], MAX_NEW_TOKENS["instruct"])
    res["instruct"] = 100 * sum(o.strip() == i["response"] for o, i in zip(outs, ins)) / len(ins)
    samples["instruct"] = outs[:3]

    res["ppl"] = perplexity(model, tok, [t["text"] for t in heldout["text"]])
    return {k: round(v, 2) for k, v in res.items()}, samples


def format_table(report: dict) -> str:
    head = "| model | math EM % | code pass % | ua compliance % | refusal % | instruct EM % | text ppl |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for role, m in report["scores"].items():
        lines.append(f"| {role} | {m['math']:.1f} | {m['code']:.1f} | {m['ua_compliance']:.1f} | "
                     f"{m['refusal']:.1f} | {m['instruct']:.1f} | {m['ppl']:.2f} |")
    gaps = report["gaps"]
    lines.append("")
    lines.append("Expert minus instruct (points): " + ", ".join(
        f"{k} {v:+.1f}" for k, v in gaps.items()))
    return "\n".join(lines)


def zoo_report(family: ZooFamily, progress: bool = True) -> dict:
    """Score base, instruct and every expert; write ``zoo_report.{json,md}``; print the table."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    heldout = {t: read_jsonl(family.heldout / f"{t}.jsonl")
               for t in ("math", "code", "ua", "instruct", "text")}
    scores, samples = {}, {}
    for role, path in tqdm(family.roles().items(), desc="zoo report", disable=not progress):
        scores[role], samples[role] = score_role(path, heldout)
    gaps = {name: round(scores[expert][metric] - scores["instruct"][metric], 2)
            for name, (expert, metric) in GAPS.items()}
    report: dict[str, Any] = {
        "family": str(family.root),
        "heldout_sizes": {t: len(v) for t, v in heldout.items()},
        "scores": scores, "gaps": gaps,
        "seconds": round(time.perf_counter() - start, 1),
        "samples": samples,
    }
    stats = family.root / "build_stats.json"
    if stats.is_file():
        report["build"] = json.loads(stats.read_text())
    table = format_table(report)
    write_json_atomic(family.root / "zoo_report.json", report)
    write_text_atomic(family.root / "zoo_report.md", f"# Zoo report: {family.root.name}\n\n{table}\n")
    print(table)
    return report
