"""Structured configs: the schema of every key a user may set, and its validation.

The dataclasses are registered in Hydra's ConfigStore (``register_configs``) as the schema of
``conf/config.yaml``, so a misspelt key is refused by OmegaConf when the config is composed.
``validate`` then checks values (ranges, allowed names) and names the key and what is allowed.
``merge`` and ``weighting`` hold the common keys only: each method and weighting declares its
own in its registry (``lata.methods.METHODS``, ``lata.weightings.WEIGHTINGS``), which
``validate_merge`` and ``validate_weighting`` read; the zoo's recipe is checked by the zoo.
The same classes are the options of the Python API, so both paths share one set of defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lata.registry import ConfigError, coerce, one_of, plain as to_plain


def config_dir() -> str:
    """The config groups (``conf/``): ``$LATA_CONFIG_DIR`` if set, else the package's own copy
    (``lata/conf``, found with importlib.resources: in a checkout a link to the repository's
    ``conf/``, in a wheel the files themselves)."""
    return os.environ.get("LATA_CONFIG_DIR") or str(importlib.resources.files("lata") / "conf")


#: names that reach file names, plots and logs (experts, benchmark tasks): checked before any work
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
UNMERGED = "none"  # merge=none evaluates one model of the family unmerged (model.which)
#: ``model.vocab``: the output has the vocabulary of the checkpoint the delta is added to
ANCHOR_VOCAB = "anchor"
#: where ``calibration`` examples come from (``lata.calibration``)
CALIBRATION_SOURCES = ("auto", "zoo", "jsonl", "lm_eval", "none")
#: which documents of an lm-eval task calibration=lm_eval reads (auto: training, else validation)
CALIBRATION_SPLITS = ("auto", "train", "validation", "test")
#: the family's reserved roles; every other role is an expert's name
ROLES = ("base", "instruct")
ANCHORS = ("instruct", "base")
DTYPES = ("float32", "float16", "bfloat16")
LOGGERS = ("none", "wandb")
LOGGER_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class ModelConfig:
    """A family of checkpoints: local directories or hub ids.

    ``embedded`` names a family the project builds itself (``zoo``); its paths are filled
    in by the builder and the keys below stay null.
    """

    name: str = "paths"
    embedded: Optional[str] = None
    base: Optional[str] = None
    instruct: Optional[str] = None
    experts: Dict[str, str] = field(default_factory=dict)
    which: str = "instruct"  # merge=none: the role evaluated unmerged (base, instruct or an expert)
    #: where the merged vectors are added: null = the anchor (the spec's formula); a role (base,
    #: instruct, an expert) or a directory / hub id: theta = theta_target + sum_k lambda_k v_k
    target: Optional[str] = None
    dtype: str = "auto"  # dtype the model is loaded in for evaluation: auto | float32 | bfloat16 | float16
    #: whose vocabulary (embedding rows, tokenizer, config) the merged model has where the
    #: checkpoints' differ: anchor (the model the delta is added to) or an expert's name
    vocab: str = ANCHOR_VOCAB


class MergeConfig:
    """``merge``: the method (a registry name, ``lata.methods.METHODS``, or a dotted path), the
    scales lambda (``lam``, per expert ``lams``), the anchor, and the method's own keys
    (``params``: TIES's density, DARE's p, ...; each method declares its own).

    ``MergeConfig(method="ties", density=0.3)`` in Python; ``MergeConfig.of(cfg.merge)`` from a
    composed config. Values are checked by ``validate_merge``.
    """

    COMMON = ("method", "lam", "lams", "anchor")

    def __init__(self, method: str = "ta", lam: float = 1.0, lams: Optional[Dict[str, float]] = None,
                 anchor: str = "instruct", **params: Any):
        self.method, self.lam, self.anchor = method, lam, anchor
        self.lams = dict(lams or {})
        self.params = params

    @classmethod
    def of(cls, node: Any) -> "MergeConfig":
        """A MergeConfig from itself, a mapping or a config node."""
        return node if isinstance(node, cls) else cls(**to_plain(node))

    def as_dict(self) -> dict:
        """The plain ``merge`` node: what the resume key and the summaries record."""
        return {"method": self.method, "lam": self.lam, "lams": dict(self.lams), "anchor": self.anchor, **self.params}

    def __repr__(self) -> str:
        return f"MergeConfig({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


class WeightingConfig:
    """``weighting``: the layer weighting (a registry name, ``lata.weightings.WEIGHTINGS``, or a
    dotted path), ``normalize`` (none | mean), ``rest_weight`` (tensors outside the blocks; None:
    the weighting's default, 1.0 for all but LiNeS) and the weighting's own keys (``params``)."""

    COMMON = ("name", "normalize", "rest_weight")

    def __init__(self, name: str = "linear_rank", normalize: str = "none", rest_weight: Optional[float] = None,
                 **params: Any):
        self.name, self.normalize, self.rest_weight = name, normalize, rest_weight
        self.params = params

    @classmethod
    def of(cls, node: Any) -> "WeightingConfig":
        return node if isinstance(node, cls) else cls(**to_plain(node))

    def as_dict(self) -> dict:
        return {"name": self.name, "normalize": self.normalize, "rest_weight": self.rest_weight, **self.params}

    def __repr__(self) -> str:
        return f"WeightingConfig({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


@dataclass
class BenchmarkConfig:
    """A suite of lm-eval tasks and how to run them: LATA's own (lata.evaluation.tasks.TASKS),
    lm-eval's registry, or the user's task YAMLs in ``include_path``."""

    name: str = "none"
    tasks: List[str] = field(default_factory=list)
    include_path: Optional[str] = None  # a directory of the user's lm-eval task YAMLs
    limit: Optional[float] = None  # documents per task (int) or fraction (float < 1); null = all
    batch_size: int = 8  # set on HFLM
    num_fewshot: int = 0  # math tasks
    allow_code_execution: bool = False  # code tasks run model-written programs (in the sandbox)
    pass_k: List[int] = field(default_factory=lambda: [1])
    code_samples: int = 1  # completions per problem; >1 samples at `temperature` for pass@k
    temperature: float = 0.8
    code_timeout_s: float = 5.0
    #: tokens of context in evaluation (HFLM's max_length; generation keeps half for the prompt),
    #: never more than the model's max_position_embeddings; null = the model's whole context.
    #: Bounds time and memory (logits are batch x length x vocab): a CPU finishes in minutes at
    #: 2048 where a model's 8192-token context takes hours
    max_length: Optional[int] = 2048
    ppl_window: Optional[int] = None  # strided token perplexity window; null = the context length
    ppl_stride: int = 512


@dataclass
class CalibrationConfig:
    """Examples of each expert's task for the data-aware merge methods (``lata.calibration``)."""

    name: str = "auto"  # auto (the zoo's task sets on model=zoo, else none) | zoo | jsonl | lm_eval | none
    examples: int = 32  # drawn per expert
    seed: int = 0  # of the draw
    max_length: int = 256  # tokens per example
    files: Dict[str, str] = field(default_factory=dict)  # jsonl: expert -> file
    tasks: Dict[str, str] = field(default_factory=dict)  # lm_eval: expert -> lm-eval task name
    include_path: Optional[str] = None  # lm_eval: a directory of the user's task YAMLs
    split: str = "auto"  # lm_eval: auto (training docs, else validation) | train | validation | test
    max_memory: Optional[str] = None  # bytes the model may take on the device; null: 90% of what is free


@dataclass
class LoggerConfig:
    """Where a job's results go besides its run directory (lata.results.logger): none | wandb."""

    name: str = "none"
    project: str = "lata"
    entity: Optional[str] = None
    mode: str = "auto"  # auto | online | offline | disabled; auto: online only when an API key is configured
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None  # where W&B writes its files; null = the run directory (<run_dir>/wandb/)


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "outputs"
    cache_dir: str = "${oc.env:LATA_CACHE,${oc.env:HOME,.}/.cache/lata}"
    results_dir: str = "${oc.env:LATA_RESULTS,outputs/results}"  # finished points, for resume


@dataclass
class ObjectiveConfig:
    """What ``hparams_search=optuna`` maximises (lata.run.objective.objective)."""

    tasks: Optional[List[str]] = None  # tasks whose primary metrics are averaged; null = math and code tasks
    ppl_task: Optional[str] = None  # null = the suite's perplexity task
    ppl_ceiling: Optional[float] = None  # points above it score below every feasible point


@dataclass
class LataConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    #: the common keys; conf/merge/<method>.yaml adds the method's own (lata.methods registry)
    merge: Dict[str, Any] = field(default_factory=lambda: MergeConfig().as_dict())
    #: the common keys; conf/weighting/<name>.yaml adds the weighting's own (lata.weightings)
    weighting: Dict[str, Any] = field(default_factory=lambda: WeightingConfig().as_dict())
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    #: the embedded zoo's recipe (conf/zoo/<preset>.yaml); its keys and types are those of
    #: lata.zoo.presets.ZooConfig, checked when the zoo is built (config imports no zoo)
    zoo: Dict[str, Any] = field(default_factory=dict)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    save_model: Optional[str] = None
    overwrite: Any = False  # false | true (only a directory LATA wrote) | force (lata.io.outputs)
    out_dtype: Optional[str] = None
    device: str = "cpu"
    shard_size: str = "2GB"
    threads: Optional[int] = None
    progress: bool = True
    dry_run: bool = False
    resume: bool = True
    #: mergekit: also write the merge as a mergekit recipe, mergekit.yaml in the run directory
    export: Optional[str] = None


def check_calibration(cfg: Any) -> None:
    """Refuse a bad ``calibration`` node (naming the key)."""
    one_of("calibration", cfg.name, CALIBRATION_SOURCES)
    for key in ("examples", "max_length"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calibration.{key}={value!r} must be a whole number, at least 1")
    if cfg.name == "jsonl" and not cfg.get("files"):
        raise ConfigError("calibration=jsonl needs calibration.files.<expert>=FILE.jsonl for every expert")
    if cfg.get("max_memory") is not None:
        parse_size(cfg.max_memory, key="calibration.max_memory")
    if cfg.name == "lm_eval":
        if not cfg.get("tasks"):
            raise ConfigError("calibration=lm_eval needs calibration.tasks.<expert>=<lm-eval task> for every expert")
        one_of("calibration.split", cfg.get("split", "auto"), CALIBRATION_SPLITS)


def check_vocab(vocab: str, experts: List[str], has_target: bool) -> None:
    """``model.vocab`` must be ``anchor`` or an expert's name, and an expert's only without a
    target (whose vocabulary the output then has); ConfigError naming the key otherwise."""
    if vocab == ANCHOR_VOCAB:
        return
    if vocab not in experts:
        raise ConfigError(f"model.vocab={vocab!r} is not allowed; choose {ANCHOR_VOCAB} or an expert: "
                          f"{', '.join(experts)}")
    if has_target:
        raise ConfigError(f"model.vocab={vocab} and model.target: the output has the target's vocabulary; "
                          f"set model.vocab={ANCHOR_VOCAB}")


def role_map(base: Any, instruct: Any, experts: Dict[str, Any]) -> Dict[str, Any]:
    """A family's roles in their one order: base (left out where None), instruct, then each
    expert by name (the values: paths, checkpoints, digests...)."""
    return {**({"base": base} if base is not None else {}), "instruct": instruct, **experts}


def register_configs() -> None:
    """Register the schema with Hydra (``defaults: [lata_schema, ...]`` in conf/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="lata_schema", node=LataConfig)


def validate_merge(merge: Any, also: tuple[str, ...] = ()):
    """Check a ``merge`` node (or MergeConfig) against the method registry; return the checked
    method object (``lata.methods.MergeMethod``). ConfigError names the key; ``also``: further
    names the caller accepts, listed in the message (the app's ``none``)."""
    from lata.methods import METHODS

    m = MergeConfig.of(merge)
    if "." not in str(m.method):
        one_of("merge.method", m.method, METHODS.names() + list(also))
    one_of("merge.anchor", m.anchor, ANCHORS)
    coerce("merge.lam", m.lam, float)
    if not isinstance(m.lams, dict):
        raise ConfigError(f"merge.lams={m.lams!r} must map expert names to numbers")
    for name, value in m.lams.items():
        coerce(f"merge.lams.{name}", value, float)
    return METHODS.build(m.method, m.params)


def validate_lams(lams: Dict[str, float], experts: List[str]) -> None:
    """Every ``merge.lams.<name>`` must name an expert of the family."""
    unknown = sorted(set(lams) - set(experts))
    if unknown:
        raise ConfigError(f"merge.lams.{unknown[0]} names no expert; experts are: {', '.join(experts)}")


def validate_weighting(weighting: Any):
    """Check a ``weighting`` node (or WeightingConfig) against the weighting registry; return
    the checked weighting object (``lata.weightings.Weighting``)."""
    from lata.weightings import NORMALIZE, WEIGHTINGS

    w = WeightingConfig.of(weighting)
    one_of("weighting.normalize", w.normalize, NORMALIZE)
    if w.rest_weight is not None:
        coerce("weighting.rest_weight", w.rest_weight, float)
    part = WEIGHTINGS.build(w.name, w.params)
    files = part.inputs()
    return part.given({key: read_input(key, path) for key, path in files.items()}) if files else part


#: the largest file a part of the config reads (``weighting.from_mergekit``)
MAX_INPUT_BYTES = 10_000_000


def read_input(key: str, path: str) -> bytes:
    """The bytes of a file a config key names (a regular file of at most ``MAX_INPUT_BYTES``);
    ConfigError naming the key and the file otherwise."""
    from lata.io.files import CheckpointError, read_bounded

    try:
        return read_bounded(os.path.expanduser(str(path)), f"{key}: the file", MAX_INPUT_BYTES)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def check_name(key: str, value: Any) -> None:
    """A name that reaches file names, plots and logs: letters, digits, '_', '-', '.' (at most 64,
    starting with a letter or digit)."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a usable name; use letters, digits, '_', '-' and '.' "
                          f"(at most 64, starting with a letter or digit)")


def validate_benchmark(b: BenchmarkConfig) -> None:
    """Values only: task names are checked against LATA's tasks, lm-eval's registry and
    ``include_path`` when the harness loads them, before any generation."""
    if any(not isinstance(t, str) or not t for t in b.tasks):
        raise ConfigError(f"benchmark.tasks={list(b.tasks)} must be a list of task names")
    for task in b.tasks:
        check_name("benchmark.tasks", task)
    if getattr(b, "include_path", None) and not os.path.isdir(os.path.expanduser(str(b.include_path))):
        raise ConfigError(f"benchmark.include_path={b.include_path} is not a directory (of lm-eval task YAMLs)")
    if b.limit is not None and b.limit <= 0:
        raise ConfigError(f"benchmark.limit={b.limit} must be positive (or null for every document)")
    if b.batch_size < 1 or b.code_samples < 1:
        raise ConfigError("benchmark.batch_size and benchmark.code_samples must be at least 1")
    for key in ("max_length", "ppl_window"):
        if getattr(b, key) is not None and getattr(b, key) < 2:
            raise ConfigError(f"benchmark.{key}={getattr(b, key)} must be at least 2 tokens (or null)")
    for k in b.pass_k:
        if not 1 <= k <= b.code_samples:
            raise ConfigError(f"benchmark.pass_k has {k}: each k must lie in [1, benchmark.code_samples={b.code_samples}]")


def validate_logger(logger: Any) -> None:
    one_of("logger.name", logger.name, LOGGERS)
    one_of("logger.mode", logger.mode, LOGGER_MODES)


def check_known_keys(cfg: Any, schema: type = LataConfig, prefix: str = "") -> None:
    """Refuse a key the schema does not have, naming it and the closest known key.

    Hydra adds keys given with ``+`` or ``++`` even to a typed node, so a misspelt
    ``++merge.densty=0.7`` would otherwise be carried along unused; this walks the composed
    config against the dataclasses. Dict-typed keys (``model.experts``, ``merge.lams``) take any
    name.
    """
    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    known = [f.name for f in dataclasses.fields(schema)]
    for key in cfg.keys():
        if key not in hints:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{prefix}{key} is not a known key{hint}")
        if dataclasses.is_dataclass(hints[key]):
            check_known_keys(cfg[key], hints[key], f"{prefix}{key}.")


def validate(cfg: Any) -> None:
    """Check every key and value of a composed config; raise ConfigError naming the key."""
    check_known_keys(cfg)
    if cfg.merge.method == UNMERGED:
        extra = sorted(set(cfg.merge) - set(MergeConfig.COMMON))
        if extra:
            raise ConfigError(f"merge.{extra[0]} is not a key of merge=none (a model evaluated unmerged)")
    else:
        method = validate_merge(cfg.merge, also=(UNMERGED,))
    if cfg.export is not None:
        one_of("export", cfg.export, ("mergekit",))
        if cfg.merge.method == UNMERGED:
            raise ConfigError("export=mergekit writes a merge's recipe; merge=none merges nothing")
        method.check_exportable(has_target=cfg.model.target not in (None, ""))
    validate_weighting(cfg.weighting)
    check_calibration(cfg.calibration)
    validate_benchmark(cfg.benchmark)
    validate_logger(cfg.logger)
    if cfg.out_dtype is not None:
        one_of("out_dtype", cfg.out_dtype, DTYPES)
    if cfg.overwrite not in (False, True, "force"):
        raise ConfigError(f"overwrite={cfg.overwrite!r} is not allowed; choose one of: false, true, force")
    if not (cfg.device == "cpu" or cfg.device == "mps" or str(cfg.device).startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r} is not allowed; use cpu, cuda, cuda:N or mps")
    parse_size(cfg.shard_size, key="shard_size")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be at least 1 (or null for one per core, at most 8)")
    model = cfg.model
    if model.embedded is None:
        missing = [k for k in ROLES if not getattr(model, k)]
        if missing:
            raise ConfigError(f"model.{missing[0]} is not set: give a directory or hub id (++model.{missing[0]}=...)")
        if not model.experts:
            raise ConfigError("model.experts is empty: add at least one, e.g. ++model.experts.math=PATH")
    one_of("model.dtype", model.dtype, ("auto",) + DTYPES)
    if model.embedded is None and model.which not in ROLES + tuple(model.experts):
        raise ConfigError(f"model.which={model.which!r} is not allowed; choose one of: "
                          f"{', '.join(ROLES + tuple(model.experts))}")
    if model.target not in (None, "") and cfg.merge.method == UNMERGED:
        raise ConfigError(f"model.target={model.target!r} names where merged vectors are added; with merge=none "
                          f"nothing is merged (model.which picks the model to evaluate)")
    for name, path in model.experts.items():
        check_name(f"model.experts.{name}", name)
        if name in ROLES:
            raise ConfigError(f"model.experts.{name}: {' and '.join(map(repr, ROLES))} are reserved role names")
        if model.embedded is None and (path is None or not str(path).strip()):
            raise ConfigError(f"model.experts.{name} is empty: give a directory or hub id")
    if model.experts:
        validate_lams(cfg.merge.lams, list(model.experts))
        if cfg.merge.method != UNMERGED:
            method.check_experts(list(model.experts))
    if model.experts:  # an embedded family's experts are known once it is built (Family checks them)
        check_vocab(model.get("vocab", ANCHOR_VOCAB), list(model.experts), model.target not in (None, ""))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: Any, key: str = "size") -> int:
    """'2GB' / '500MiB' / 123 -> bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    try:
        size = int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a size; write e.g. 2GB, 500MB or 1GiB") from None
    if size <= 0:
        raise ConfigError(f"{key}={value!r} must be positive")
    return size
