"""Evaluate an in-memory model on a benchmark suite through lm-eval (HFLM + simple_evaluate).

The model object is evaluated where it is (no save/reload); lm-eval's request cache is never
used, so different merged weights can never share responses. Generation tasks whose prompts are
chat turns (the zoo's) and plain ones run as two lm-eval calls, because the chat template is a
per-call switch. Code is scored afterwards, in the sandbox, from the logged samples. Token
perplexity (``strided_perplexity``) is computed here, from the model's logits.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from lata.evaluation.sandbox import SandboxLimits, ensure_code_execution_allowed
from lata.evaluation.scoring import score_code
from lata.evaluation.tasks import LM_EVAL_PPL_TEXT, TASKS, DataPaths, render_tasks

log = logging.getLogger("lata")


@torch.no_grad()
def strided_perplexity(model: Any, tokenizer: Any, texts: list[str], window: int, stride: int) -> dict:
    """Token-level perplexity of the concatenated texts with a sliding window (the papers' number).

    Every token but the first is predicted exactly once, ``stride`` new tokens per window, each
    with at least ``window - stride`` tokens of left context (Hugging Face's recipe, without its
    off-by-one at window borders). Returns perplexity, the token count and the mean NLL in nats.
    """
    stride = max(1, min(stride, window - 1))  # each window keeps at least one token of context
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids
    device = next(model.parameters()).device
    total_nll, count, done, length = 0.0, 0, 1, ids.size(1)  # the first token is never predicted
    while done < length:
        end = min(done + stride, length)
        chunk = ids[:, max(0, end - window):end].to(device)
        new = end - done
        logits = model(chunk).logits[:, -new - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                chunk[:, -new:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        count += new
        done = end
    return {"token_perplexity": math.exp(total_nll / count), "tokens": count, "nll": total_nll / count}


def evaluate(model: Any, tokenizer: Any, bench: Any, work_dir: Path, data_dir: Path,
             zoo_heldout: Path | None = None) -> dict[str, dict[str, float]]:
    """Run ``bench.tasks`` on the model; return {task: {metric: value}}.

    A name LATA defines (``lata.evaluation.tasks.TASKS``) is rendered with its data and scored by
    LATA (code in the sandbox); any other name is looked up in lm-eval's own registry and in
    ``bench.include_path`` (a directory of the user's task YAMLs) and scored by lm-eval, with
    every numeric metric it reports (for a group: the group's and each subtask's; a metric that
    lm-eval reports under several filters as ``<metric>_<filter>``, e.g. gsm8k's
    ``exact_match_strict_match``). The texts of ``LM_EVAL_PPL_TEXT``'s tasks (``wikitext``) also
    get LATA's strided token perplexity. Unknown names are refused before any generation.
    lm-eval's own tasks that execute model-written code stay refused by lm-eval: such code runs
    only in LATA's sandbox (``lata_humaneval``).
    """
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    names = list(bench.tasks)
    if any(TASKS[n].kind == "code" for n in names if n in TASKS):
        ensure_code_execution_allowed(bool(bench.allow_code_execution))  # before any generation
    context = context_length(model, bench.max_length)
    own, others = [n for n in names if n in TASKS], [n for n in names if n not in TASKS]
    specs = render_tasks(own, Path(work_dir) / "lm_eval_tasks", DataPaths(Path(data_dir), zoo_heldout),
                         num_fewshot=int(bench.num_fewshot), code_samples=int(bench.code_samples),
                         temperature=float(bench.temperature), context=context)
    manager = _task_manager(others, Path(work_dir) / "lm_eval_tasks", getattr(bench, "include_path", None))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(bench.batch_size), max_length=context)
    metrics: dict[str, dict[str, float]] = {}
    if others:  # lm-eval's tasks and the user's, plain prompts, scored by lm-eval
        metrics.update(_lm_eval_tasks(lm, others, manager, model, tokenizer, bench, context))
    for chat in (False, True):
        group = [s for s in specs if s.chat == chat]
        if group:
            metrics.update(_own_tasks(lm, group, chat, manager, model, tokenizer, bench, context))
    return metrics


def task_manager(names: list[str], include: list[str]) -> Any:
    """lm-eval's TaskManager over the task YAML directories ``include``, with lm-eval's own
    registry indexed (seconds) only where ``names`` names a task outside them."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include or None, include_defaults=True)
    return manager


def _task_manager(others: list[str], rendered: Path, user_dir: str | None) -> Any:
    """``task_manager`` over LATA's rendered YAMLs and ``user_dir``; an unknown name is refused."""
    include = [str(rendered)] + ([str(Path(user_dir).expanduser())] if user_dir else [])
    manager = task_manager(others, include)
    unknown = [n for n in others if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown benchmark task '{unknown[0]}': not one of LATA's ({', '.join(TASKS)}), nor in "
                         f"lm-eval's registry{' or in ' + str(user_dir) if user_dir else ''}")
    return manager


def _lm_eval_tasks(lm: Any, names: list[str], manager: Any, model: Any, tokenizer: Any, bench: Any,
                   context: int) -> dict[str, dict[str, float]]:
    """Tasks that lm-eval scores (its own and the user's): every numeric metric it reports, plus
    LATA's token perplexity of ``LM_EVAL_PPL_TEXT``'s texts."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=bench.limit, log_samples=True,
                          random_seed=0)
    metrics = {}
    for name, result in out["results"].items():
        values = _numeric(result)
        if name in out.get("samples", {}):
            if name in LM_EVAL_PPL_TEXT:
                values.update(_token_perplexity(model, tokenizer, out["samples"][name], LM_EVAL_PPL_TEXT[name],
                                                bench, context))
            values["samples"] = _documents(out["samples"][name])
        metrics[name] = values
    return metrics


def _own_tasks(lm: Any, specs: list, chat: bool, manager: Any, model: Any, tokenizer: Any, bench: Any,
               context: int) -> dict[str, dict[str, float]]:
    """LATA's tasks of one prompt style (``chat``: chat turns), scored by LATA: code in the
    sandbox, perplexity tasks also by strided token perplexity."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[s.name for s in specs], task_manager=manager, limit=bench.limit,
                          log_samples=True, apply_chat_template=chat, random_seed=0)
    metrics = {}
    for spec in specs:
        values = _numeric(out["results"][spec.name])
        values.pop("bypass", None)
        if spec.kind == "code":
            samples = sorted(out["samples"][spec.name], key=lambda s: s["doc_id"])
            values.update(score_code([s["doc"] for s in samples], [_completions(s) for s in samples],
                                     ks=list(bench.pass_k), timeout_s=float(bench.code_timeout_s),
                                     limits=SandboxLimits(timeout_s=float(bench.code_timeout_s))))
        if spec.kind == "ppl":
            values.update(_token_perplexity(model, tokenizer, out["samples"][spec.name],
                                            spec.doc_to_text.strip("{} "), bench, context))
        values["samples"] = _documents(out["samples"][spec.name])
        metrics[spec.name] = values
    return metrics


def _documents(samples: list[dict]) -> float:
    """Documents scored (lm-eval logs a sample per document and filter: gsm8k's two filters, two samples)."""
    return float(len({s["doc_id"] for s in samples}))


def _token_perplexity(model: Any, tokenizer: Any, samples: list[dict], field: str, bench: Any,
                      context: int) -> dict:
    """LATA's strided token perplexity of the ``field`` texts of the documents lm-eval scored."""
    docs = list({s["doc_id"]: s["doc"] for s in sorted(samples, key=lambda s: s["doc_id"])}.values())
    window = min(int(bench.ppl_window or context), context)
    return strided_perplexity(model, tokenizer, [d[field] for d in docs], window, int(bench.ppl_stride))


def _numeric(result: dict) -> dict[str, float]:
    """{metric: value} of one lm-eval result entry ("metric,filter" keys; stderrs left out).

    A metric reported under one filter keeps its name; one reported under several is named
    ``<metric>_<filter>`` for each (non-alphanumerics of the filter as ``_``): lm-eval's gsm8k
    gives ``exact_match_strict_match`` and ``exact_match_flexible_extract``."""
    found = [(*k.split(",", 1), float(v)) for k, v in result.items()
             if "," in k and not k.split(",", 1)[0].endswith("_stderr") and _is_number(v)]
    filters: dict[str, int] = {}
    for metric, _, _ in found:
        filters[metric] = filters.get(metric, 0) + 1
    return {metric if filters[metric] == 1 else f"{metric}_{re.sub(r'[^0-9A-Za-z]+', '_', name)}": value
            for metric, name, value in found}


def _completions(sample: dict) -> list[str]:
    responses = sample["filtered_resps"]
    flat = responses[0] if responses and isinstance(responses[0], list) else responses
    return [str(r) for r in flat]


def context_length(model: Any, max_length: int | None = None) -> int:
    """Tokens of context for evaluation: ``benchmark.max_length`` where set, never more than the
    model's ``max_position_embeddings`` (2048 where the config has none)."""
    limit = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return limit if max_length is None else min(int(max_length), limit)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per task and metric."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, values in metrics.items():
        for name, value in values.items():
            lines.append(f"| {task} | {name} | {value:.4g} |")
    return "\n".join(lines)
