"""Hydra entry point ``lata`` (also ``python -m lata``): wiring only; the job is lata.run.runner."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lata.config import UNMERGED, ConfigError, config_dir, register_configs


def _task(cfg: DictConfig) -> float | None:
    """One job; returns the objective (lata.run.objective) for hyper-parameter sweepers."""
    from lata.results.plots import HeatmapProcess

    if cfg.merge.method != UNMERGED and not cfg.dry_run:
        _preload_kernels(cfg)
        # the layer heatmap's drawer loads matplotlib while this process loads torch
        # (lata.run.runner); the later jobs of a multirun use it too
        HeatmapProcess.shared()
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if sweep:
        from lata.results.report import FAILED_FILE

        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # from an earlier try of this job
    try:
        with interruptible():
            from lata.results.logger import log_job
            from lata.run.runner import run
            from lata.run.objective import objective

            summary = run(cfg, hc.runtime.output_dir)
            group = Path(hc.sweep.dir).name if sweep else None
            log_job(cfg.logger, run_dir=run_dir, config=cfg, summary=summary, group=group,
                    job_name=hc.job.override_dirname or None)
            return objective(summary.get("metrics"), cfg.objective)
    except (ConfigError, FileExistsError, ValueError) as exc:
        if sweep:
            return _failed_point(run_dir, hc, exc)
        # bad input: one clear line, no traceback
        print(f"lata: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the machine said no (a full disk, a lost mount): one line, naming the file
        if sweep:
            return _failed_point(run_dir, hc, exc)
        print(f"lata: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        job = f"job {hc.job.num} of the sweep" if sweep else "the run"
        _interrupted(exc, f"{job} (run directory {hc.runtime.output_dir})")
    except Exception as exc:  # an unforeseen failure: with its traceback, but a sweep goes on
        if not sweep:
            raise
        traceback.print_exc()
        return _failed_point(run_dir, hc, exc)


def _failed_point(run_dir: Path, hc, exc: BaseException) -> None:
    """Record a sweep point's failure in its run directory, say it in one line, and let the
    sweep go on: the other points run, the sweep's report lists the failed ones (with their
    errors) and the command ends with exit status 1 (``SweepReport``).

    Decision: a failed point is not stored as a result, so the same command runs it again.
    """
    from lata.io.atomic import write_json_atomic
    from lata.results.report import FAILED_FILE

    overrides = list(hc.overrides.task)
    record = {"job": hc.job.num, "overrides": overrides, "error": str(exc), "type": type(exc).__name__,
              **({"slurm_job_id": os.environ["SLURM_JOB_ID"]} if "SLURM_JOB_ID" in os.environ else {})}
    write_json_atomic(run_dir / FAILED_FILE, record)
    print(f"lata: error in job {hc.job.num} of the sweep ({' '.join(overrides)}): {exc}; the other points go on",
          file=sys.stderr)
    return None


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what ``kill`` and SLURM at a time limit send) or SIGINT, raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible():
    """For the block, SIGTERM and SIGINT raise ``Interrupted`` in the main thread, so the work
    unwinds: every temporary output is removed on the way (``lata.io.atomic``), locks are let go.
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
    """Start loading numba (lata.accel.kernels.preload) while this thread imports torch, when the
    family is given as local directories whose safetensors files are large enough for the
    kernels (sooner than loading it once the family is open). Hub ids and the embedded
    families are left to the passes, which start it once they know the family's size
    (``layer_similarities``, ``plan_merge``)."""
    from lata.accel import kernels

    if str(cfg.device) != "cpu" or cfg.model.embedded is not None:
        return
    dirs = [cfg.model.base, cfg.model.instruct, *(cfg.model.experts or {}).values()]
    local = [Path(str(d)).expanduser() for d in dirs if d is not None]
    if all(d.is_dir() for d in local) and kernels.worthwhile(
            sum(f.stat().st_size for d in local for f in d.glob("*.safetensors"))):
        kernels.preload()


class InputGuard(Callback):
    """Before Hydra makes a run or sweep directory (and writes ``.hydra/`` into it): refuse one,
    or a results or cache directory, that is or lies inside an input checkpoint the config
    names, in one line (exit status 2). The runner checks again once the family is resolved."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, {"run directory": config.hydra.run.dir})

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, {"sweep directory": config.hydra.sweep.dir})

    @staticmethod
    def _check(config: DictConfig, directories: dict) -> None:
        from lata.io.outputs import OutputError, check_outside_inputs
        from lata.sources import named_inputs

        try:
            check_outside_inputs({**directories, "results directory": config.paths.results_dir,
                                  "cache directory": config.paths.cache_dir}, named_inputs(config.model))
        except OutputError as exc:
            print(f"lata: error: {exc}", file=sys.stderr)
            sys.exit(2)


class SweepReport(Callback):
    """At the end of a multirun: ``lata-report`` on the sweep directory (results table and plots,
    and the points that failed, with their errors); a sweep with a failed point ends with exit
    status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from lata.results.report import build_report, failed_points

        global _failed_in_sweep
        failed = failed_points(config.hydra.sweep.dir)
        _failed_in_sweep = len(failed)
        for point in failed:
            print(f"lata: failed: job {point['job']} ({' '.join(point['overrides'])}): {point['error']}",
                  file=sys.stderr)
        try:
            written = build_report(config.hydra.sweep.dir)
        except Exception as exc:  # a report never fails a finished sweep; lata-report can redo it
            print(f"lata: warning: no sweep report: {exc}", file=sys.stderr)
            return
        print(f"sweep report: {', '.join(str(p) for p in written.values())}")


_failed_in_sweep = 0


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
    if _failed_in_sweep:
        print(f"lata: {_failed_in_sweep} point(s) of the sweep failed (listed above and in the sweep's "
              f"results.md); the same command runs them again", file=sys.stderr)
        sys.stdout.flush()
        sys.exit(1)
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
