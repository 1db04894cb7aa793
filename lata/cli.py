"""Hydra entry point ``lata`` (also ``python -m lata``): wiring only; the job is lata.runner."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lata.config import ConfigError, config_dir, register_configs


def _task(cfg: DictConfig) -> float | None:
    """One job; returns the objective (lata.objective) for hyper-parameter sweepers."""
    from lata.plots import HeatmapProcess

    if cfg.merge.method != "none" and not cfg.dry_run:
        _preload_kernels(cfg)
        # the layer heatmap's drawer loads matplotlib while this process loads torch
        # (lata.runner); the later jobs of a multirun use it too
        HeatmapProcess.shared()
    hc = HydraConfig.get()
    try:
        with interruptible():
            from lata.logger import log_job
            from lata.runner import run
            from lata.objective import objective

            summary = run(cfg, hc.runtime.output_dir)
            group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
            log_job(cfg.logger, run_dir=Path(hc.runtime.output_dir), config=cfg, summary=summary, group=group,
                    job_name=hc.job.override_dirname or None)
            return objective(summary.get("metrics"), cfg.objective)
    except (ConfigError, FileExistsError, ValueError) as exc:
        # bad input: one clear line, no traceback
        print(f"lata: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the machine said no (a full disk, a lost mount): one line, naming the file
        print(f"lata: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        job = f"job {hc.job.num} of the sweep" if hc.mode == RunMode.MULTIRUN else "the run"
        _interrupted(exc, f"{job} (run directory {hc.runtime.output_dir})")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what ``kill`` and SLURM at a time limit send) or SIGINT, raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible():
    """For the block, SIGTERM and SIGINT raise ``Interrupted`` in the main thread, so the work
    unwinds: every temporary output is removed on the way (``lata.atomic``), locks are let go.
    A second signal during that clean-up is ignored. Outside the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _interrupted(exc: KeyboardInterrupt, what: str) -> None:
    """One line for an interrupt, and the exit status a shell gives it (128 + signal)."""
    signum = getattr(exc, "signum", signal.SIGINT)
    print(f"lata: interrupted by {signal.Signals(signum).name} in {what}: its temporary outputs were removed; "
          f"finished points are stored, and the same command resumes after them", file=sys.stderr)
    sys.exit(128 + signum)


def _preload_kernels(cfg: DictConfig) -> None:
    """Start loading numba (lata.kernels.preload) while this thread imports torch, when the
    family is given as local directories whose safetensors files are large enough for the
    kernels (sooner than loading it once the family is open). Hub ids and the embedded
    families are left to the passes, which start it once they know the family's size
    (``layer_similarities``, ``plan_merge``)."""
    from lata import kernels

    if str(cfg.device) != "cpu" or cfg.model.embedded is not None:
        return
    dirs = [cfg.model.base, cfg.model.instruct, *(cfg.model.experts or {}).values()]
    local = [Path(str(d)).expanduser() for d in dirs if d is not None]
    if all(d.is_dir() for d in local) and kernels.worthwhile(
            sum(f.stat().st_size for d in local for f in d.glob("*.safetensors"))):
        kernels.preload()


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


def entry() -> None:
    """The ``lata`` command: ``main()``; after a run that ended well, the process ends without
    the interpreter's teardown.

    Decision: the atexit handlers run as at any exit (logging, W&B, launchers) and the standard
    streams are flushed; what is skipped is clearing every module and torch's C++ destructors,
    a fixed cost of every command. Every output is a closed, renamed file by then. While a
    thread that is not a daemon is alive, the exit is the ordinary one (it waits for it).
    """
    try:
        main()
    except KeyboardInterrupt as exc:  # before or after a job (while Hydra starts, or reports)
        _interrupted(exc, "lata")
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, or a closed pipe
            pass
    os._exit(0)


if __name__ == "__main__":
    entry()
