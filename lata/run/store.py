"""The results store: every finished point, kept under ``paths.results_dir/<point key>/``.

A point is keyed by everything that determines its numbers (``point_key``; docs/runs.md lists
it): the content of every input checkpoint, the merge, weighting, benchmark and its data, the
evaluation dtype and device kind, and LATA's code version. With ``resume=true`` (the default) a
point whose results are stored is not recomputed: its files are checked against the digests
recorded with them and copied into the new run directory (``restore``). A stored point that
does not match its record is computed again, with a warning naming the file. A killed sweep
therefore loses only the point it was on; re-running the same command finishes it. A saved
merged model is keyed apart (``model_key``), by what determines its bytes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lata.io.atomic import atomic_directory, atomic_file, write_json_atomic
from lata.config import (ANCHOR_VOCAB, UNMERGED, WeightingConfig, parse_size, to_plain, validate_merge,
                         validate_weighting)
from lata.io.digests import DamagedFile, bytes_digest, content_key, read_checked_json, write_checked_json
from lata.weightings import WEIGHTINGS
from lata.run.fingerprints import KEY_VERSION, checkpoint_digests, code_version, input_digest
from lata.results.mergekit import RECIPE_FILE
from lata.io.outputs import holds_model

log = logging.getLogger("lata")

RESULT_FILES = ("summary.json", "metrics.json", "layer_analysis.json", "layer_analysis.csv", "layer_analysis.png",
                RECIPE_FILE)
#: the digest of every stored file, written last (checked JSON: ``lata.io.digests``)
MANIFEST = "manifest.json"


def _inputs(checkpoints: dict[str, str]) -> dict[str, Any]:
    """What every key shares: the key version, LATA's code, each checkpoint's content."""
    return {"v": KEY_VERSION, "code": code_version(),
            "checkpoints": checkpoint_digests(checkpoints)}


def _weighting(cfg: DictConfig) -> dict:
    """The weighting node, with the content of each file it reads (``Weighting.inputs``: the
    mergekit recipe of weighting=explicit)."""
    weighting = to_plain(cfg.weighting)
    w = WeightingConfig.of(cfg.weighting)
    for key, path in WEIGHTINGS.build(w.name, w.params).inputs().items():
        weighting[f"{key.rpartition('.')[2]}_content"] = input_digest(path, key)
    return weighting


def uses_calibration(cfg: DictConfig) -> bool:
    """Whether the point's method uses calibration statistics or its weighting learns from
    calibration data."""
    return cfg.merge.method != UNMERGED and (validate_merge(cfg.merge).statistic is not None
                                             or validate_weighting(cfg.weighting).needs_learning)


def _calibration(cfg: DictConfig) -> dict | None:
    """The calibration node (with the content of each file it reads and the zoo recipe its task
    sets come from) for a point that uses calibration data (``uses_calibration``); None for any other."""
    if not uses_calibration(cfg):
        return None
    node = to_plain(cfg.calibration)
    node.pop("max_memory", None)  # where the pass runs, not what it computes
    node["files"] = {k: input_digest(path, f"calibration.files.{k}") for k, path in (node.get("files") or {}).items()}
    if node.get("include_path"):
        node["include_path"] = input_digest(node["include_path"], "calibration.include_path")
    return {**node, "zoo": to_plain(cfg.zoo) if cfg.model.get("embedded") == "zoo" else None}


def _calibrated(cfg: DictConfig) -> dict:
    """``{"calibration": ...}`` for a key where the point uses calibration data, else nothing
    (the keys of other points stay as they were)."""
    node = _calibration(cfg)
    return {} if node is None else {"calibration": node}


def point_key(cfg: DictConfig, checkpoints: dict[str, str], heldout: str | None = None) -> str:
    """What determines a point's numbers: the inputs' content, merge, weighting (and a recipe it
    reads), benchmark and the content of its data, evaluation dtype and device kind, code."""
    merge = to_plain(cfg.merge)
    unmerged = merge["method"] == UNMERGED
    benchmark = {k: v for k, v in to_plain(cfg.benchmark).items() if k != "name"}
    return content_key({
        **_inputs(checkpoints),
        "merge": {"method": UNMERGED, "which": cfg.model.which} if unmerged else merge,
        "weighting": None if unmerged else _weighting(cfg),
        **_calibrated(cfg),
        "benchmark": benchmark,
        "benchmark_data": _benchmark_data(cfg, heldout) if benchmark.get("tasks") else None,
        "dtype": cfg.model.dtype,
        "vocab": cfg.model.get("vocab", ANCHOR_VOCAB),
        "device": str(cfg.get("device", "cpu")).split(":")[0] if benchmark.get("tasks") else None,
    })


def _benchmark_data(cfg: DictConfig, heldout: str | None) -> dict:
    """The content of the files the benchmark reads: LATA's tasks' data and the user's task
    directory (lm-eval's own tasks are covered by its version, in the code version)."""
    from lata.evaluation.tasks import data_digests

    paths = cfg.get("paths") or {}
    data_dir = Path(paths.get("cache_dir", ".")) / "data"
    out: dict[str, Any] = {"tasks": data_digests(list(cfg.benchmark.tasks), data_dir,
                                                  Path(heldout) if heldout else None)}
    if cfg.benchmark.get("include_path"):
        out["include_path"] = input_digest(cfg.benchmark.include_path, "benchmark.include_path")
    return out


def model_key(cfg: DictConfig, checkpoints: dict[str, str]) -> str:
    """What determines the bytes of a saved merged model: the inputs' content, merge, weighting,
    output dtype, shard size and code (kept in its marker, ``lata.io.outputs``)."""
    return content_key({
        **_inputs(checkpoints),
        "merge": to_plain(cfg.merge),
        "weighting": _weighting(cfg),
        **_calibrated(cfg),
        "out_dtype": cfg.out_dtype,
        "vocab": cfg.model.get("vocab", ANCHOR_VOCAB),
        "shard_size": parse_size(cfg.shard_size, key="shard_size"),
    })


@dataclass(frozen=True)
class StoredPoint:
    """A stored point read whole: its folder and the bytes of its files, each checked against
    the manifest (``stored_result``)."""

    folder: Path
    files: dict[str, bytes]

    @property
    def summary(self) -> dict:
        return json.loads(self.files["summary.json"])


def stored_model(stored: StoredPoint, model_key: str) -> Path | None:
    """The merged model a stored point saved, where it is still there with ``model_key`` (its
    content is checked as it is copied: ``lata.io.outputs.copy_checkpoint``)."""
    saved = stored.summary.get("saved_model")
    return Path(saved) if isinstance(saved, str) and holds_model(saved, model_key, verify=False) else None


def stored_result(results_dir: str | os.PathLike, key: str) -> StoredPoint | None:
    """The stored point ``key`` where it is whole (every file matches its recorded digest); None
    where there is none, or it is damaged (a warning names the file: the point is computed again
    and stored over it)."""
    folder = Path(results_dir) / key
    if not folder.exists():
        return None
    try:
        return StoredPoint(folder, _verified(folder))
    except DamagedFile as exc:
        log.warning("stored point %s is damaged (%s): computing it again", folder, exc)
        return None


def _verified(folder: Path) -> dict[str, bytes]:
    """{name: bytes} of a stored point's files, each checked against the manifest; DamagedFile
    naming the file otherwise."""
    try:
        manifest = read_checked_json(folder / MANIFEST)
    except FileNotFoundError:
        raise DamagedFile(f"{folder / MANIFEST} is missing") from None
    except OSError as exc:
        raise DamagedFile(f"{folder / MANIFEST} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
            or "summary.json" not in manifest["files"]:
        raise DamagedFile(f"{folder / MANIFEST} lists no summary.json")
    files = {}
    for name, digest in manifest["files"].items():
        if name not in RESULT_FILES:
            raise DamagedFile(f"{folder / MANIFEST} lists {name!r}, which no point stores")
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise DamagedFile(f"{folder / name} cannot be read ({exc.strerror or exc})") from None
        if bytes_digest(data) != digest:
            raise DamagedFile(f"{folder / name} does not match its recorded digest")
        files[name] = data
    try:
        summary = json.loads(files["summary.json"])
    except ValueError as exc:
        raise DamagedFile(f"{folder / 'summary.json'} is not valid JSON: {exc}") from None
    if not isinstance(summary, dict):
        raise DamagedFile(f"{folder / 'summary.json'} is not a JSON object")
    return files


def restore(stored: StoredPoint, run_dir: Path, saved_model: str | None = None) -> dict:
    """Write a stored point's checked files into ``run_dir``; return its summary (marked as
    resumed), naming this run's own directories: ``saved_model`` where this run saved one, else
    none."""
    summary = stored.summary
    for name, data in stored.files.items():
        if name == "summary.json":
            continue
        with atomic_file(run_dir / name) as tmp:
            tmp.write_bytes(data)
    summary.update(resumed_from=summary.get("run_dir"), run_dir=str(run_dir))
    summary.pop("saved_model", None)
    if saved_model is not None:
        summary["saved_model"] = saved_model
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def store(results_dir: str | os.PathLike, key: str, run_dir: Path) -> None:
    """Copy a finished point's files into the store with the digest of each (``MANIFEST``, last),
    atomically: the point counts as done after."""
    with atomic_directory(Path(results_dir) / key) as tmp:
        digests = {}
        for name in RESULT_FILES:
            if (run_dir / name).is_file():
                data = (run_dir / name).read_bytes()
                (tmp / name).write_bytes(data)
                digests[name] = bytes_digest(data)
        write_checked_json(tmp / MANIFEST, {"key": key, "files": digests})
