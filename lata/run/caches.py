"""What makes the points of a sweep cheap: reuse within a process, and caches on disk.

A Hydra multirun with the basic launcher runs every point in one process, so this module keeps,
for the life of the process:
  * each family's checkpoints open (memory-mapped: read from disk once, then from the page cache);
  * each family's layer analysis (pass 1), computed once; also on disk under
    ``paths.cache_dir/analysis/<key>.json`` for multi-process launchers (joblib, submitit), keyed
    by the content of base, instruct and experts and LATA's code version (``lata.run.fingerprints``;
    the layer weights are derived from it per point: they cost microseconds, so the weighting is
    not part of the key);
  * each family's selections (``Family.selections``: per-tensor magnitude thresholds, such as
    TIES's, which no lambda or layer weight changes), likewise also on disk under
    ``paths.cache_dir/selections/``;
  * one loaded evaluation model, into which each point copies its merged weights in place.

Decision: the task vectors are not held in memory between points; each point streams them again
from the (page-cached) checkpoints, which keeps memory bounded by one tensor per expert whatever
the model size. A cache file is stored with the digest of its content (``lata.io.digests``) and
never fails a run: one that is damaged or cannot be used is computed and written again, with a
warning naming it. (Finished points themselves are kept by ``lata.run.store``.)
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

from lata.analysis import LayerAnalysis, layer_similarities
from lata.config import ANCHOR_VOCAB, parse_size, role_map
from lata.io.atomic import file_lock
from lata.io.files import CheckpointError
from lata.io.digests import DamagedFile, content_key, read_checked_json, write_checked_json
from lata.family import Family
from lata.run.fingerprints import KEY_VERSION, checkpoint_digests, code_version

log = logging.getLogger("lata")
T = TypeVar("T")

_families: dict[tuple, Family] = {}
_analyses: dict[str, LayerAnalysis] = {}
_model: dict[str, Any] = {}  # {"key": (dir, dtype, device), "model": nn.Module}


# --------------------------------------------------------------------------- families and pass 1

def open_family(base: str, instruct: str, experts: dict[str, str], target: str | None = None,
                vocab: str = ANCHOR_VOCAB) -> Family:
    """The family (with its target, if any, and the output's vocabulary), opened once per process."""
    key = (base, instruct, tuple(experts.items()), target, vocab)
    if key not in _families:
        _families[key] = Family.open(base, instruct, experts, target, vocab)
    return _families[key]


def _family_key(family: Family) -> str:
    roles = role_map(family.base.path, family.instruct.path, {f"expert:{k}": c.path for k, c in family.experts.items()})
    return content_key({"v": KEY_VERSION, "code": code_version(), **checkpoint_digests(roles)})


def family_analysis(family: Family, cache_dir: str | os.PathLike, device: str = "cpu",
                    progress: bool = True, threads: int | None = None) -> LayerAnalysis:
    """Pass 1 for ``family``: from this process, else from the disk cache, else computed and stored."""
    key = _family_key(family)
    if key in _analyses:
        return _analyses[key]
    file = Path(cache_dir) / "analysis" / f"{key}.json"
    parse = lambda data: _checked_analysis(LayerAnalysis(**data), family)  # noqa: E731
    analysis = _read_cache(file, parse)
    if analysis is None:
        # one process computes it; others that need it meanwhile (the jobs of a parallel sweep)
        # wait for the lock and read what it wrote
        file.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(file.parent / f".{key}.lock", remove=True):
            analysis = _read_cache(file, parse)
            if analysis is None:
                analysis = layer_similarities(family, device=device, progress=progress, threads=threads)
                write_checked_json(file, asdict(analysis))
                log.info("layer analysis computed and cached in %s", file)
                _analyses[key] = analysis
                return analysis
    log.info("layer analysis reused from %s", file)
    _analyses[key] = analysis
    return analysis


def _checked_analysis(analysis: LayerAnalysis, family: Family) -> LayerAnalysis:
    if analysis.num_layers != family.num_layers or set(analysis.experts) != set(family.expert_names) or any(
            len(values) != family.num_layers for values in (analysis.instr_sq, *analysis.dot.values(),
                                                            *analysis.comp_sq.values())):
        raise ValueError("it does not describe this family's experts and layers")
    return analysis


def _read_cache(file: Path, parse: Callable[[Any], T]) -> T | None:
    """``parse`` of a cache file's data (checked JSON); None where there is none or it cannot be
    used (with a warning): a cache file never fails a run, it is computed and written again."""
    try:
        return parse(read_checked_json(file))
    except FileNotFoundError:
        return None
    except (OSError, DamagedFile, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("cache file %s ignored (%s: %s)", file, type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------- selections

def _selections_file(family: Family, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "selections" / f"{_family_key(family)}.json"


def _stored_selections(file: Path) -> dict[tuple, float]:
    def parse(entries: list) -> dict[tuple, float]:
        return {tuple(tuple(k) if isinstance(k, list) else k for k in key): float(value) for key, value in entries}

    return _read_cache(file, parse) or {}


def load_selections(family: Family, cache_dir: str | os.PathLike) -> None:
    """Add the disk cache's selections for ``family`` (``Family.selections``, thresholds selected
    by earlier processes: ``paths.cache_dir/selections/``) to the open family.

    Called before every merge, whatever its method: one small file read (none where no process
    selected anything for this family), the family's key being already known from its layer
    analysis; a method that selects nothing never looks the entries up."""
    file = _selections_file(family, cache_dir)
    stored = _stored_selections(file)
    new = stored.keys() - family.selections.keys()
    if new:
        family.selections.update((key, stored[key]) for key in new)
        log.info("%d magnitude selections reused from %s", len(new), file)


def save_selections(family: Family, cache_dir: str | os.PathLike) -> None:
    """Store the family's selections with those on disk, when it has new ones. Decision:
    concurrent processes may each rewrite the file (atomically); a selection lost that way is
    only selected again."""
    if not family.selections:  # nothing selected: no file to read
        return
    file = _selections_file(family, cache_dir)
    stored = _stored_selections(file)
    if stored.keys() >= family.selections.keys():
        return
    stored.update(family.selections)
    write_checked_json(file, [[list(key), value] for key, value in stored.items()])


# --------------------------------------------------------------------------- the evaluation model

# --------------------------------------------------------------------------- calibration statistics

_calibrated: dict[str, Any] = {}


def calibration_statistics(cfg: Any, family: Family, kind: str) -> dict[str, Any] | None:
    """Each expert's ``kind`` statistics on its calibration examples (``lata.calibration``):
    from this process, else from ``paths.cache_dir/calibration/``, else computed there; keyed by
    the expert's content, the examples, ``calibration.max_length`` and LATA's code. None where
    ``calibration`` gives no examples (``plan_merge`` then refuses a method that needs them)."""
    from lata.calibration import calibration_sets, examples_digest
    from lata.calibration.statistics import FILE, Statistics, compute
    from lata.io.digests import cached_build

    sets = calibration_sets(cfg.calibration, family.expert_names, cfg.get("zoo"), cfg.model.get("embedded"))
    if sets is None:
        return None
    max_memory = cfg.calibration.get("max_memory")
    max_memory = None if max_memory is None else parse_size(max_memory, key="calibration.max_memory")
    out = {}
    for expert, examples in sets.items():
        ckpt = family.experts[expert]
        if getattr(ckpt, "instruct", None) is not None:
            raise CheckpointError(f"calibration: expert '{expert}' is a LoRA adapter; the calibration pass runs whole "
                                  f"checkpoints only (merge the adapter into its model first)")
        config = {"kind": kind, "checkpoint": checkpoint_digests({expert: ckpt.path})[expert],
                  "examples": examples_digest(examples), "max_length": cfg.calibration.max_length}
        key = content_key(config)
        if key not in _calibrated:
            folder = cached_build(Path(cfg.paths.cache_dir) / "calibration", kind, config,
                                  lambda tmp, e=expert, c=ckpt, x=examples: compute(
                                      kind, c.path, x, cfg.calibration.max_length, tmp, device=cfg.device,
                                      progress=cfg.progress, label=e, max_memory=max_memory), code_version())
            _calibrated[key] = Statistics(folder / FILE, kind)
        out[expert] = _calibrated[key]
    return out


def learned_weights(cfg: Any, family: Family) -> dict[str, list[float]]:
    """``weighting=learned``'s block weights for this family, anchor, lambdas, rest weight,
    calibration examples and weighting keys (``lata.calibration.learned``): from this process,
    else from ``paths.cache_dir/learned/``, else learned there (with ``weights.json`` holding the
    objective at each step)."""
    import json

    from lata.calibration import calibration_sets, examples_digest
    from lata.calibration.learned import learn_weights
    from lata.calibration.statistics import load_model
    from lata.config import MergeConfig, validate_weighting
    from lata.io.atomic import write_json_atomic
    from lata.io.digests import cached_build
    from lata.registry import ConfigError

    scheme = validate_weighting(cfg.weighting)
    sets = calibration_sets(cfg.calibration, family.expert_names, cfg.get("zoo"), cfg.model.get("embedded"))
    if sets is None:
        raise ConfigError("weighting=learned learns from calibration data, and calibration gives none: on the "
                          "embedded zoo calibration=auto draws its task sets; elsewhere give calibration=jsonl "
                          "++calibration.files.<expert>=FILE.jsonl")
    merge = MergeConfig.of(cfg.merge)
    lams = [float(merge.lams.get(k, merge.lam)) for k in family.expert_names]
    rest = scheme.rest_weight(cfg.weighting.get("rest_weight"))
    anchor = family.anchor(merge.anchor)
    keys = {"objective": scheme.objective, "steps": scheme.steps, "lr": scheme.lr, "init": scheme.init,
            "low": scheme.low, "high": scheme.high}
    config = {"family": _family_key(family), "anchor": merge.anchor, "lams": lams, "rest_weight": rest,
              "examples": {k: examples_digest(v) for k, v in sets.items()},
              "max_length": cfg.calibration.max_length, "weighting": keys}
    key = content_key(config)
    if key not in _calibrated:
        def build(tmp: Path) -> None:
            from tqdm.auto import tqdm

            model, tokenizer = load_model(anchor.path, cfg.device)
            trace: list[float] = []
            bar = tqdm(total=scheme.steps, desc=f"weighting=learned ({scheme.objective})", disable=not cfg.progress,
                       leave=False)

            def step(_: int, loss: float) -> None:
                trace.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                bar.update()

            try:
                weights = learn_weights(model, tokenizer, family, lams, rest, sets,
                                        max_length=cfg.calibration.max_length, progress=step, **keys)
            finally:
                bar.close()
            write_json_atomic(tmp / "weights.json", {"weights": weights, "objective": trace})
            log.info("weighting=learned: %s from %.4f to %.4f in %d steps", scheme.objective, trace[0], trace[-1],
                     len(trace))

        folder = cached_build(Path(cfg.paths.cache_dir) / "learned", "weights", config, build, code_version())
        _calibrated[key] = json.loads((folder / "weights.json").read_text())["weights"]
    return _calibrated[key]


def evaluation_model(model_dir: str, dtype: str, device: str, *, reusable: bool):
    """A loaded causal LM for ``model_dir``.

    ``reusable=True`` (merge points): the process's cached model is returned when it was loaded
    from the same directory, dtype and device; the caller overwrites every checkpoint tensor in
    place. ``reusable=False`` (unmerged reference rows): always a fresh load, and the cached model
    is dropped first, so no state can leak between points and at most one model is held.
    """
    key = (str(model_dir), dtype, str(device))
    if reusable and _model.get("key") == key:
        return _model["model"]
    _model.clear()
    log.info("loading %s for evaluation (dtype %s, device %s)", model_dir, dtype, device)
    model = _load(model_dir, dtype, device)
    if reusable:
        _model.update(key=key, model=model)
    return model


def forget_model() -> None:
    """Drop the cached model (after a failure that may have left it half-written)."""
    _model.clear()


def _load(path: str, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    with _named("model", path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device).eval()


def load_tokenizer(path: str):
    """The tokenizer of the checkpoint at ``path`` (CheckpointError naming it where its files
    cannot be read)."""
    from transformers import AutoTokenizer

    with _named("tokenizer", path):
        return AutoTokenizer.from_pretrained(path)


@contextmanager
def _named(what: str, path: str):
    """transformers' errors on malformed files as one line naming the checkpoint."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"cannot load the {what} of {path}: {text[:500]}") from exc
