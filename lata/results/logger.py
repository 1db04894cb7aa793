"""Logging a finished job somewhere besides its run directory: ``logger=none`` or ``logger=wandb``.

The files in the run directory are the source of truth; a logger only mirrors them, and it
never fails a run: if wandb is missing or any W&B call raises, a warning is logged and the job
goes on.

W&B decisions:
- One W&B run per job, opened and closed (``finish``, also on error) inside ``log_job``;
  ``reinit="create_new"`` so it never touches another active run. ``group`` is the sweep.
- ``mode=auto`` follows WANDB_MODE when set, else is online only when an API key is configured
  (WANDB_API_KEY, or a netrc entry for the W&B host), else offline. ``mode=online`` without a
  key also logs offline (with a warning): W&B never prompts for a login.
- Offline runs live in ``<dir>/wandb/`` (``dir`` null: the run directory); ``wandb sync`` uploads
  them later.
- Logged: the resolved config; every metric as a summary scalar ``task/metric`` plus
  ``task_score``; the layer analysis as an image (the heatmap PNG: similarities above, weights
  below) and a table (expert, layer, similarity, weight); the job's results row (the same row
  as ``lata-report``'s results.csv) as a one-row table.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lata.config import LOGGERS

log = logging.getLogger("lata")


def log_job(logger_cfg: Any, *, run_dir: Path, config: dict, summary: dict, group: str | None = None,
            job_name: str | None = None) -> None:
    """Mirror one finished job (its ``summary`` and the files in ``run_dir``) to the logger.

    ``config``: the resolved config (a dict or DictConfig); ``group``: the sweep's name (null for
    a single run); ``job_name``: the run's name (default: its point, e.g. ``ta+log_rank lam=0.5``).
    """
    if logger_cfg.name == "none":
        return
    if logger_cfg.name != "wandb":
        log.warning("logger=%s is unknown (choose one of: %s): nothing logged", logger_cfg.name, ", ".join(LOGGERS))
        return
    try:
        _log_wandb(logger_cfg, Path(run_dir), config, summary, group, job_name)
    except Exception as exc:  # noqa: BLE001 - W&B never fails a run; results are on disk
        log.warning("W&B logging failed (%s: %s); the results are in %s", type(exc).__name__, exc, run_dir)


def resolve_mode(mode: str) -> str:
    """The W&B mode to use: see the module docstring."""
    if mode == "auto":
        return os.environ.get("WANDB_MODE") or ("online" if api_key_configured() else "offline")
    if mode == "online" and not api_key_configured():
        log.warning("logger.mode=online but no W&B API key is configured (WANDB_API_KEY or `wandb login`): "
                    "logging offline; upload later with `wandb sync`")
        return "offline"
    return mode


def api_key_configured() -> bool:
    """WANDB_API_KEY is set, or the netrc file has an entry for the W&B host (WANDB_BASE_URL)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _log_wandb(logger_cfg: Any, run_dir: Path, config: Any, summary: dict, group: str | None,
               job_name: str | None) -> None:
    from omegaconf import DictConfig, OmegaConf

    from lata.results.tables import point_name, result_row

    mode = resolve_mode(logger_cfg.mode)
    if mode == "disabled":
        return
    try:
        import wandb
    except ImportError:
        log.warning("logger=wandb but wandb is not installed (pip install wandb): nothing logged")
        return
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    row = result_row(summary, run=run_dir.name)
    wandb_dir = Path(logger_cfg.dir) if logger_cfg.dir else run_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=logger_cfg.project, entity=logger_cfg.entity, group=group, name=job_name or point_name(row),
        job_type="reference" if row["evaluated"] != "merged" else "merge", tags=list(logger_cfg.tags or []),
        config=dict(config), dir=str(wandb_dir), mode=mode, reinit="create_new",
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        scalars = {f"{task}/{name}": value for task, values in (summary.get("metrics") or {}).items()
                   for name, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if row["task_score"] is not None:
            scalars["task_score"] = row["task_score"]
        run.summary.update(scalars)
        data = {"results": wandb.Table(columns=list(row), data=[list(row.values())])}
        analysis_file = run_dir / "layer_analysis.json"
        if analysis_file.is_file():
            analysis = json.loads(analysis_file.read_text())
            weights = analysis.get("weights") or {}
            layers = [[expert, layer, s, weights[expert][layer] if expert in weights else None]
                      for expert, sims in analysis["similarities"].items() for layer, s in enumerate(sims)]
            data["layer_analysis/table"] = wandb.Table(columns=["expert", "layer", "similarity", "weight"], data=layers)
        if (run_dir / "layer_analysis.png").is_file():
            data["layer_analysis/heatmap"] = wandb.Image(str(run_dir / "layer_analysis.png"),
                                                         caption="similarity to the instruction vector (above), "
                                                                 "layer weights (below)")
        run.log(data)
    finally:
        run.finish()
