"""Hydra entry point ``lata`` (also ``python -m lata``): wiring only; the job is lata.runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lata.config import ConfigError, register_configs


def config_dir() -> str:
    """``conf/`` of the repository (editable install) unless LATA_CONFIG_DIR says otherwise."""
    return os.environ.get("LATA_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / "conf"))


def _task(cfg: DictConfig) -> float | None:
    """One job; returns the objective (lata.sweep.objective) for hyper-parameter sweepers."""
    from lata.logger import log_job
    from lata.runner import run
    from lata.sweep import objective

    hc = HydraConfig.get()
    try:
        summary = run(cfg, hc.runtime.output_dir)
        group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
        log_job(cfg.logger, run_dir=Path(hc.runtime.output_dir), config=cfg, summary=summary, group=group,
                job_name=hc.job.override_dirname or None)
        return objective(summary.get("metrics"), cfg.objective)
    except (ConfigError, FileExistsError, ValueError) as exc:
        # bad input: one clear line, no traceback
        print(f"lata: error: {exc}", file=sys.stderr)
        sys.exit(2)


class SweepReport(Callback):
    """At the end of a multirun: ``lata-report`` on the sweep directory (results table and plots)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from lata.report import build_report

        try:
            written = build_report(config.hydra.sweep.dir)
        except Exception as exc:  # a report never fails a finished sweep; lata-report can redo it
            print(f"lata: warning: no sweep report: {exc}", file=sys.stderr)
            return
        print(f"sweep report: {', '.join(str(p) for p in written.values())}")


def main() -> None:
    register_configs()
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
