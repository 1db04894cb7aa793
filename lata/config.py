"""Structured configs: the schema of every key a user may set, and its validation.

The dataclasses are registered in Hydra's ConfigStore (``register_configs``) as the schema of
``conf/config.yaml``, so a misspelt key is refused by OmegaConf when the config is composed.
``validate`` then checks values (ranges, allowed names) and names the key and what is allowed.
The same dataclasses are the options of the Python API, so both paths share one set of defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lata.zoo.presets import ZooConfig


def config_dir() -> str:
    """The config groups (``conf/``): ``$LATA_CONFIG_DIR`` if set, else the package's own copy
    (``lata/conf``, found with importlib.resources: in a checkout a link to the repository's
    ``conf/``, in a wheel the files themselves)."""
    return os.environ.get("LATA_CONFIG_DIR") or str(importlib.resources.files("lata") / "conf")


METHODS = ("ta", "ties", "dare", "dare_ties")
APP_METHODS = METHODS + ("none",)  # merge=none evaluates one model of the family unmerged
ROLES = ("base", "instruct")
ANCHORS = ("instruct", "base")
TOPK_SCOPES = ("tensor", "global")
WEIGHTINGS = ("uniform", "threshold", "linear_rank", "log_rank", "explicit")
NORMALIZE = ("none", "mean")
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


@dataclass
class MergeConfig:
    method: str = "ta"
    lam: float = 1.0
    lams: Dict[str, float] = field(default_factory=dict)
    density: float = 0.2
    topk_scope: str = "tensor"
    p: float = 0.9
    seed: int = 0
    anchor: str = "instruct"


@dataclass
class WeightingConfig:
    name: str = "linear_rank"
    drop: float = 0.5
    threshold: float = 0.95
    normalize: str = "none"
    rest_weight: float = 1.0
    weights: Optional[List[float]] = None


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
class LoggerConfig:
    """Where a job's results go besides its run directory (lata.logger): none | wandb."""

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
    """What ``hparams_search=optuna`` maximises (lata.sweep.objective)."""

    tasks: Optional[List[str]] = None  # tasks whose primary metrics are averaged; null = math and code tasks
    ppl_task: Optional[str] = None  # null = the suite's perplexity task
    ppl_ceiling: Optional[float] = None  # points above it score below every feasible point


@dataclass
class LataConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    save_model: Optional[str] = None
    overwrite: Any = False  # false | true (only a directory LATA wrote) | force (lata.outputs)
    out_dtype: Optional[str] = None
    device: str = "cpu"
    shard_size: str = "2GB"
    threads: Optional[int] = None
    progress: bool = True
    dry_run: bool = False
    resume: bool = True


def to_plain(node: Any) -> Any:
    """A config node as plain dicts/lists (resolved); anything else unchanged."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def register_configs() -> None:
    """Register the schema with Hydra (``defaults: [lata_schema, ...]`` in conf/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="lata_schema", node=LataConfig)


class ConfigError(ValueError):
    """A config value is out of range or not one of the allowed names."""


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _in_range(key: str, value: float, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value} is out of range; it must lie in {interval}")


def validate_merge(m: MergeConfig, allowed: tuple[str, ...] = METHODS) -> None:
    _one_of("merge.method", m.method, allowed)
    _one_of("merge.anchor", m.anchor, ANCHORS)
    _one_of("merge.topk_scope", m.topk_scope, TOPK_SCOPES)
    _in_range("merge.density", m.density, 0.0, 1.0, low_open=True, high_open=False)
    _in_range("merge.p", m.p, 0.0, 1.0, low_open=False, high_open=True)


def validate_lams(lams: Dict[str, float], experts: List[str]) -> None:
    """Every ``merge.lams.<name>`` must name an expert of the family."""
    unknown = sorted(set(lams) - set(experts))
    if unknown:
        raise ConfigError(f"merge.lams.{unknown[0]} names no expert; experts are: {', '.join(experts)}")


def validate_weighting(w: WeightingConfig) -> None:
    _one_of("weighting.name", w.name, WEIGHTINGS)
    _one_of("weighting.normalize", w.normalize, NORMALIZE)
    _in_range("weighting.drop", w.drop, 0.0, 1.0, low_open=False, high_open=True)
    _in_range("weighting.threshold", w.threshold, -1.0, 1.0, low_open=False, high_open=False)
    if w.name == "explicit" and not w.weights:
        raise ConfigError("weighting=explicit needs weighting.weights: a list of one number per layer")


def validate_benchmark(b: BenchmarkConfig) -> None:
    """Values only: task names are checked against LATA's tasks, lm-eval's registry and
    ``include_path`` when the harness loads them, before any generation."""
    if any(not isinstance(t, str) or not t for t in b.tasks):
        raise ConfigError(f"benchmark.tasks={list(b.tasks)} must be a list of task names")
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
    _one_of("logger.name", logger.name, LOGGERS)
    _one_of("logger.mode", logger.mode, LOGGER_MODES)


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
    validate_merge(cfg.merge, APP_METHODS)
    validate_weighting(cfg.weighting)
    validate_benchmark(cfg.benchmark)
    validate_logger(cfg.logger)
    if cfg.out_dtype is not None:
        _one_of("out_dtype", cfg.out_dtype, DTYPES)
    if cfg.overwrite not in (False, True, "force"):
        raise ConfigError(f"overwrite={cfg.overwrite!r} is not allowed; choose one of: false, true, force")
    if not (cfg.device == "cpu" or cfg.device == "mps" or str(cfg.device).startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r} is not allowed; use cpu, cuda, cuda:N or mps")
    parse_size(cfg.shard_size, key="shard_size")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be at least 1 (or null for one per core, at most 8)")
    model = cfg.model
    if model.embedded == "smollm2" and cfg.merge.method != "none":
        raise ConfigError(f"model=smollm2 is a single instruct model with no base or experts: it can only be "
                          f"evaluated (merge=none), not merged with merge={cfg.merge.method}")
    if model.embedded is None:
        missing = [k for k in ("base", "instruct") if not getattr(model, k)]
        if missing:
            raise ConfigError(f"model.{missing[0]} is not set: give a directory or hub id (++model.{missing[0]}=...)")
        if not model.experts:
            raise ConfigError("model.experts is empty: add at least one, e.g. ++model.experts.math=PATH")
    _one_of("model.dtype", model.dtype, ("auto",) + DTYPES)
    if model.embedded is None and model.which not in ROLES + tuple(model.experts):
        raise ConfigError(f"model.which={model.which!r} is not allowed; choose one of: "
                          f"{', '.join(ROLES + tuple(model.experts))}")
    if model.target not in (None, "") and cfg.merge.method == "none":
        raise ConfigError(f"model.target={model.target!r} names where merged vectors are added; with merge=none "
                          f"nothing is merged (model.which picks the model to evaluate)")
    for name in model.experts:
        if name in ("base", "instruct"):
            raise ConfigError(f"model.experts.{name}: 'base' and 'instruct' are reserved role names")
    if model.experts:
        validate_lams(cfg.merge.lams, list(model.experts))


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
