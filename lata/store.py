"""The results store: every finished point, kept under ``paths.results_dir/<point key>/``.

A point is keyed by what determines its numbers (checkpoint contents, merge, weighting,
benchmark, evaluation dtype: ``point_key``). With ``resume=true`` (the default) a point whose
results exist is not recomputed: its files are copied into the new run directory (``restore``).
A killed sweep therefore loses only the point it was on; re-running the same command finishes it.
A saved merged model is keyed apart (``model_key``), by what determines its bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from lata.atomic import atomic_directory, write_json_atomic
from lata.config import parse_size, to_plain
from lata.fingerprints import KEY_VERSION, content_key, fingerprint
from lata.interop import RECIPE_FILE
from lata.outputs import holds_model

RESULT_FILES = ("summary.json", "metrics.json", "layer_analysis.json", "layer_analysis.csv", "layer_analysis.png",
                RECIPE_FILE)


def point_key(cfg: DictConfig, checkpoints: dict[str, str]) -> str:
    """What determines a point's numbers: checkpoint contents, merge, weighting, benchmark, dtype."""
    merge = to_plain(cfg.merge)
    unmerged = merge["method"] == "none"
    return content_key({
        "v": KEY_VERSION,
        "checkpoints": {role: fingerprint(path) for role, path in checkpoints.items()},
        "merge": {"method": "none", "which": cfg.model.which} if unmerged else merge,
        "weighting": None if unmerged else to_plain(cfg.weighting),
        "benchmark": {k: v for k, v in to_plain(cfg.benchmark).items() if k != "name"},
        "dtype": cfg.model.dtype,
    })


def model_key(cfg: DictConfig, checkpoints: dict[str, str]) -> str:
    """What determines the bytes of a saved merged model: checkpoint contents, merge, weighting,
    output dtype and shard size (kept in its marker, ``lata.outputs``)."""
    return content_key({
        "v": KEY_VERSION,
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
