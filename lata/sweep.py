"""What makes a sweep cheap and resumable: reuse within a process, caches and results on disk.

A Hydra multirun with the basic launcher runs every point in one process, so this module keeps,
for the life of the process:
  * each family's checkpoints open (memory-mapped: read from disk once, then from the page cache);
  * each family's layer analysis (pass 1), computed once; also on disk under
    ``paths.cache_dir/analysis/<key>.json`` for multi-process launchers (joblib, submitit), keyed
    by the content fingerprints of base, instruct and experts (the layer weights are derived from
    it per point: they cost microseconds, so the weighting is not part of the key);
  * each family's TIES selections (``Family.selections``: the per-tensor thresholds, which no
    lambda or layer weight changes), likewise also on disk under ``paths.cache_dir/selections/``;
  * one loaded evaluation model, into which each point copies its merged weights in place.

Decision: the task vectors are not held in memory between points; each point streams them again
from the (page-cached) checkpoints, which keeps memory bounded by one tensor per expert whatever
the model size.

Results: every finished point is also stored under ``paths.results_dir/<point key>/``, keyed by
what determines its numbers (checkpoint contents, merge, weighting, benchmark, evaluation dtype).
With ``resume=true`` (the default) a point whose results exist is not recomputed: its files are
copied into the new run directory. A killed sweep therefore loses only the point it was on;
re-running the same command finishes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, TypeVar

from omegaconf import DictConfig

from lata.analysis import LayerAnalysis, layer_similarities
from lata.atomic import atomic_directory, write_json_atomic
from lata.checkpoints import resolve
from lata.config import parse_size, to_plain
from lata.evaluation.tasks import mean_task_score, primary_metric
from lata.family import Family
from lata.outputs import holds_model

log = logging.getLogger("lata")
T = TypeVar("T")

STORE_VERSION = 1
RESULT_FILES = ("summary.json", "metrics.json", "layer_analysis.json", "layer_analysis.csv", "layer_analysis.png")
_SAMPLES, _BLOCK = 16, 1 << 16

_families: dict[tuple, Family] = {}
_analyses: dict[str, LayerAnalysis] = {}
_fingerprints: dict[tuple, str] = {}
_model: dict[str, Any] = {}  # {"key": (dir, dtype, device), "model": nn.Module}


# --------------------------------------------------------------------------- fingerprints

def fingerprint(path_or_id: str | os.PathLike) -> str:
    """A content fingerprint of a checkpoint: sha256 over each safetensors file's name, size,
    header (every tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB blocks.

    Decision: a sampled hash, not a full one. It changes whenever shapes or headers change and,
    for retrained weights, whenever any sampled block does; hashing all of a 70B family would cost
    minutes per sweep. Memoised per process by (path, size, mtime).
    """
    folder = resolve(path_or_id)
    files = sorted(folder.glob("*.safetensors"))
    stamp = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _fingerprints:
        digest = hashlib.sha256()
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(header_len))
                for i in range(_SAMPLES):
                    f.seek((size * i) // _SAMPLES)
                    digest.update(f.read(_BLOCK))
        _fingerprints[stamp] = digest.hexdigest()
    return _fingerprints[stamp]


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- in-process reuse

def open_family(base: str, instruct: str, experts: dict[str, str], target: str | None = None) -> Family:
    """The family (with its target, if any), opened once per process."""
    key = (base, instruct, tuple(experts.items()), target)
    if key not in _families:
        _families[key] = Family.open(base, instruct, experts, target)
    return _families[key]


def _family_key(family: Family) -> str:
    roles = {"base": family.base.path, "instruct": family.instruct.path,
             **{f"expert:{k}": c.path for k, c in family.experts.items()}}
    return _key({"v": STORE_VERSION, **{role: fingerprint(path) for role, path in roles.items()}})


def family_analysis(family: Family, cache_dir: str | os.PathLike, device: str = "cpu",
                    progress: bool = True, threads: int | None = None) -> LayerAnalysis:
    """Pass 1 for ``family``: from this process, else from the disk cache, else computed and stored."""
    key = _family_key(family)
    if key in _analyses:
        return _analyses[key]
    file = Path(cache_dir) / "analysis" / f"{key}.json"
    analysis = _read_cache(file, lambda data: _checked_analysis(LayerAnalysis(**data), family))
    if analysis is not None:
        log.info("layer analysis reused from %s", file)
    else:
        analysis = layer_similarities(family, device=device, progress=progress, threads=threads)
        write_json_atomic(file, asdict(analysis))
        log.info("layer analysis computed and cached in %s", file)
    _analyses[key] = analysis
    return analysis


def _checked_analysis(analysis: LayerAnalysis, family: Family) -> LayerAnalysis:
    if analysis.num_layers != family.num_layers or set(analysis.experts) != set(family.expert_names) or any(
            len(values) != family.num_layers for values in (analysis.instr_sq, *analysis.dot.values(),
                                                            *analysis.comp_sq.values())):
        raise ValueError("it does not describe this family's experts and layers")
    return analysis


def _read_cache(file: Path, parse: Callable[[Any], T]) -> T | None:
    """``parse`` of a cache file's JSON; None where there is none or it cannot be used (with a
    warning): a cache file never fails a run, it is computed and written again."""
    if not file.is_file():
        return None
    try:
        return parse(json.loads(file.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("cache file %s ignored (%s: %s)", file, type(exc).__name__, exc)
        return None


def _selections_file(family: Family, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "selections" / f"{_family_key(family)}.json"


def _stored_selections(file: Path) -> dict[tuple, float]:
    def parse(entries: list) -> dict[tuple, float]:
        return {tuple(tuple(k) if isinstance(k, list) else k for k in key): float(value) for key, value in entries}

    return _read_cache(file, parse) or {}


def load_selections(family: Family, cache_dir: str | os.PathLike) -> None:
    """Add the disk cache's TIES selections for ``family`` (``Family.selections``, thresholds
    selected by earlier processes: ``paths.cache_dir/selections/``) to the open family."""
    file = _selections_file(family, cache_dir)
    stored = _stored_selections(file)
    new = stored.keys() - family.selections.keys()
    if new:
        family.selections.update((key, stored[key]) for key in new)
        log.info("%d TIES selections reused from %s", len(new), file)


def save_selections(family: Family, cache_dir: str | os.PathLike) -> None:
    """Store the family's selections with those on disk, when it has new ones. Decision:
    concurrent processes may each rewrite the file (atomically); a selection lost that way is
    only selected again."""
    if not family.selections:  # nothing selected (not TIES): no file to read
        return
    file = _selections_file(family, cache_dir)
    stored = _stored_selections(file)
    if stored.keys() >= family.selections.keys():
        return
    stored.update(family.selections)
    write_json_atomic(file, [[list(key), value] for key, value in stored.items()])


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
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()


# --------------------------------------------------------------------------- results store

def point_key(cfg: DictConfig, checkpoints: dict[str, str]) -> str:
    """What determines a point's numbers: checkpoint contents, merge, weighting, benchmark, dtype."""
    merge = to_plain(cfg.merge)
    unmerged = merge["method"] == "none"
    return _key({
        "v": STORE_VERSION,
        "checkpoints": {role: fingerprint(path) for role, path in checkpoints.items()},
        "merge": {"method": "none", "which": cfg.model.which} if unmerged else merge,
        "weighting": None if unmerged else to_plain(cfg.weighting),
        "benchmark": {k: v for k, v in to_plain(cfg.benchmark).items() if k != "name"},
        "dtype": cfg.model.dtype,
    })


def model_key(cfg: DictConfig, checkpoints: dict[str, str]) -> str:
    """What determines the bytes of a saved merged model: checkpoint contents, merge, weighting,
    output dtype and shard size (kept in its marker, ``lata.outputs``)."""
    return _key({
        "v": STORE_VERSION,
        "checkpoints": {role: fingerprint(path) for role, path in checkpoints.items()},
        "merge": to_plain(cfg.merge),
        "weighting": to_plain(cfg.weighting),
        "out_dtype": cfg.out_dtype,
        "shard_size": parse_size(cfg.shard_size, key="shard_size"),
    })


def stored_model(stored: Path, model_key: str) -> Path | None:
    """The merged model a stored point saved, where it is still there, whole, with ``model_key``."""
    saved = json.loads((stored / "summary.json").read_text()).get("saved_model")
    return Path(saved) if saved and holds_model(saved, model_key) else None


def stored_result(results_dir: str | os.PathLike, key: str) -> Path | None:
    folder = Path(results_dir) / key
    return folder if (folder / "summary.json").is_file() else None


def restore(stored: Path, run_dir: Path, saved_model: str | None = None) -> dict:
    """Copy a stored point's files into ``run_dir``; return its summary (marked as resumed),
    naming this run's own directories: ``saved_model`` where this run saved one, else none."""
    summary = json.loads((stored / "summary.json").read_text())
    for name in RESULT_FILES[1:]:
        if (stored / name).is_file():
            shutil.copyfile(stored / name, run_dir / name)
    summary.update(resumed_from=summary.get("run_dir"), run_dir=str(run_dir))
    summary.pop("saved_model", None)
    if saved_model is not None:
        summary["saved_model"] = saved_model
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def store(results_dir: str | os.PathLike, key: str, run_dir: Path) -> None:
    """Copy a finished point's files into the store, atomically (the point counts as done after)."""
    with atomic_directory(Path(results_dir) / key, overwrite=True) as tmp:
        for name in RESULT_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)


# --------------------------------------------------------------------------- objective

def objective(metrics: dict[str, dict[str, float]] | None, spec: Any) -> float | None:
    """The value a hyper-parameter search maximises: the mean task score (``objective.tasks``, or
    every scored task), subject to ``objective.ppl_ceiling`` on ``objective.ppl_task``.

    Decision: a point above the ceiling scores ``-1 - (ppl / ceiling - 1)``, below every feasible
    point (task scores lie in [0, 1]) yet still ordered, so the search is pulled back towards it.
    """
    if not metrics:
        return None
    score = mean_task_score(metrics, list(spec.tasks) if spec.tasks else None)
    if score is None:
        return None
    if spec.ppl_ceiling is not None:
        ppl_task = spec.ppl_task or next((t for t in metrics if primary_metric(t) == "token_perplexity"), None)
        if ppl_task is None or ppl_task not in metrics:
            raise ValueError(f"objective.ppl_ceiling is set but the suite has no perplexity task "
                             f"(objective.ppl_task={spec.ppl_task!r})")
        ppl = metrics[ppl_task][primary_metric(ppl_task)]
        if ppl > spec.ppl_ceiling:
            return -1.0 - (ppl / spec.ppl_ceiling - 1.0)
    return float(score)
