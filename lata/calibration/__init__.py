"""Calibration data: a few examples of each expert's task, for the data-aware merge methods.

``merge=fisher`` and ``merge=regmean`` run each expert over examples of its own task
(``lata.calibration.statistics``): Fisher merging weighs each parameter by how much the expert's
likelihood of its answers depends on it, RegMean solves each linear layer for the inputs the
experts see. Where the examples come from is the ``calibration`` config group
(``conf/calibration/<name>.yaml``):

- ``auto`` (default): the embedded zoo's own task sets on ``model=zoo``; elsewhere none, so a
  data-aware method asks for one of the others.
- ``zoo``: the zoo's training examples of each expert's task (the examples it was fine-tuned on).
- ``jsonl``: ``calibration.files.<expert>``, a JSON-lines file per expert; each line an object
  with ``prompt`` and ``answer`` (the answer is what the Fisher's log-likelihood scores), or with
  ``text`` alone (every token scored).
- ``lm_eval``: ``calibration.tasks.<expert>``, an lm-eval task (its registry, or
  ``calibration.include_path``'s YAMLs) per expert; each document gives the prompt
  ``doc_to_text`` and the answer (the target delimiter and ``doc_to_target``, a multiple-choice
  task's gold choice; a perplexity task's text alone). ``calibration.split``: ``auto`` reads the
  training documents, else the validation documents, and refuses a task that has only test
  documents (calibrating on what a benchmark then scores); ``test`` reads them on request.

``calibration.examples`` examples are drawn per expert with ``random.Random(calibration.seed)``
(all of them where a set has no more), each cut to ``calibration.max_length`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lata.config import check_calibration
from lata.registry import ConfigError

#: the zoo's experts and the kind of their task's training examples
ZOO_TASKS = {"math": "math", "code": "code", "ua": "comply"}


@dataclass(frozen=True)
class CalibrationExample:
    """One example: ``prompt`` is context only, ``answer`` is scored (``prompt`` empty: all of it)."""

    prompt: str
    answer: str


def sample(examples: list[CalibrationExample], n: int, seed: int, what: str) -> list[CalibrationExample]:
    """``n`` of ``examples`` drawn with ``random.Random(seed)`` (all where there are fewer)."""
    if not examples:
        raise ConfigError(f"calibration: {what} has no examples")
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


def read_jsonl(path: str | Path, expert: str) -> list[CalibrationExample]:
    """The examples of a JSON-lines file; a clear error naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration.files.{expert}: {path} is not a file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"calibration.files.{expert}: {path} line {i} is not JSON ({err.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str) and "answer" not in item:
            out.append(CalibrationExample("", item["text"]))
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("answer"), str):
            out.append(CalibrationExample(item["prompt"], item["answer"]))
        else:
            raise ConfigError(f"calibration.files.{expert}: {path} line {i} needs \"prompt\" and \"answer\" strings, "
                              f"or \"text\"")
    return out


def zoo_examples(zoo_cfg: Any, experts: list[str]) -> dict[str, list[CalibrationExample]]:
    """The embedded zoo's training examples of each expert's task, as chat prompt and answer
    (the zoo's data made once for all of them)."""
    from lata.zoo.data import make_data
    from lata.zoo.presets import to_zoo_config
    from lata.zoo.tasks import EOS, chat_prompt

    unknown = [k for k in experts if k not in ZOO_TASKS]
    if unknown:
        raise ConfigError(f"calibration=zoo has task sets for {', '.join(ZOO_TASKS)}, not for expert '{unknown[0]}'")
    train = make_data(to_zoo_config(zoo_cfg)).train  # each task's examples, without the instruct mix
    return {k: [CalibrationExample(chat_prompt(e.prompt), f"{e.response}{EOS}\n") for e in train[k]
                if e.kind == ZOO_TASKS[k]] for k in experts}


def calibration_sets(cfg: Any, experts: list[str], zoo_cfg: Any = None,
                     embedded: str | None = None) -> dict[str, list[CalibrationExample]] | None:
    """{expert: its examples} for ``cfg`` (the ``calibration`` node), or None (``none``, or
    ``auto`` outside the zoo)."""
    check_calibration(cfg)
    name = cfg.name
    if name == "auto":
        name = "zoo" if embedded == "zoo" else "none"
    if name == "none":
        return None
    if name == "zoo":
        if zoo_cfg is None:
            raise ConfigError("calibration=zoo draws the embedded zoo's task sets: it needs model=zoo")
        sets = zoo_examples(zoo_cfg, experts)
        return {k: sample(sets[k], cfg.examples, cfg.seed, f"the zoo's '{k}' set") for k in experts}
    if name == "lm_eval":
        tasks = per_expert(cfg.tasks, experts, "tasks", "lm_eval", "task")
        return {k: sample(lm_eval_examples(tasks[k], cfg.get("split", "auto"), cfg.get("include_path"), k),
                          cfg.examples, cfg.seed, f"lm-eval task '{tasks[k]}'") for k in experts}
    files = per_expert(cfg.files, experts, "files", "jsonl", "file")
    return {k: sample(read_jsonl(files[k], k), cfg.examples, cfg.seed, str(files[k])) for k in experts}


def per_expert(mapping: Any, experts: list[str], key: str, source: str, what: str) -> dict[str, str]:
    """``calibration.<key>`` as a dict, refused (naming the first expert without one) unless it
    gives every expert its ``what``."""
    given = dict(mapping)
    missing = [k for k in experts if k not in given]
    if missing:
        raise ConfigError(f"calibration.{key}.{missing[0]} is not set: calibration={source} needs a {what} per expert")
    return given


def lm_eval_examples(task: str, split: str = "auto", include_path: str | None = None,
                     expert: str = "") -> list[CalibrationExample]:
    """The documents of an lm-eval task as examples (the module's docstring: which split, which
    prompt and answer)."""
    from lata.evaluation.harness import task_manager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = task_manager([task], [str(Path(include_path).expanduser())] if include_path else [])
    if task not in manager.all_tasks:
        raise ConfigError(f"calibration.tasks.{expert}={task!r} is not an lm-eval task (its registry"
                          f"{' or ' + include_path if include_path else ''})")
    found = manager.load(task)
    if found["groups"] or len(found["tasks"]) != 1:
        raise ConfigError(f"calibration.tasks.{expert}={task!r} is a group of tasks: name one task")
    t = next(iter(found["tasks"].values()))
    splits = {"train": (t.has_training_docs, t.training_docs), "validation": (t.has_validation_docs,
              t.validation_docs), "test": (t.has_test_docs, t.test_docs)}
    order = ["train", "validation"] if split == "auto" else [split]
    chosen = next((s for s in order if splits[s][0]()), None)
    if chosen is None:
        raise ConfigError(f"calibration.tasks.{expert}={task!r} has no {' or '.join(order)} documents"
                          + (" (only test documents: set calibration.split=test to calibrate on them)"
                             if split == "auto" and t.has_test_docs() else ""))
    delimiter = t.config.target_delimiter if t.config.target_delimiter is not None else " "
    out = []
    for doc in splits[chosen][1]():
        if t.OUTPUT_TYPE == "loglikelihood_rolling":
            out.append(CalibrationExample("", str(t.doc_to_target(doc))))
            continue
        target = t.doc_to_target(doc)
        if t.OUTPUT_TYPE == "multiple_choice":
            choices = t.doc_to_choice(doc)
            target = choices[target] if isinstance(target, int) else target
        elif isinstance(target, list):
            target = target[0]
        out.append(CalibrationExample(str(t.doc_to_text(doc)), f"{delimiter}{target}"))
    return out


def examples_digest(examples: list[CalibrationExample]) -> str:
    """The SHA-256 of a set of examples (part of a statistic's cache key)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.answer]).encode())
    return h.hexdigest()
