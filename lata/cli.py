"""Hydra entry point ``lata`` (also ``python -m lata``): wiring only; the job is lata.runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lata.config import ConfigError, register_configs


def config_dir() -> str:
    """``conf/`` of the repository (editable install) unless LATA_CONFIG_DIR says otherwise."""
    return os.environ.get("LATA_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / "conf"))


def _task(cfg: DictConfig) -> None:
    from lata.runner import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, FileExistsError, ValueError) as exc:
        # bad input: one clear line, no traceback
        print(f"lata: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_configs()
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
