"""Run untrusted (model-written) Python programs in a separate, limited process.

Never call ``exec`` on model output in the framework's own process: use ``run_program``.
Each program gets its own interpreter (``python -I -S -B``: no site-packages, no environment
variables read), a fresh temporary working directory that is deleted afterwards, a cleared
environment, a wall-clock limit (the whole process group is killed), CPU-time, address-space,
process-count and file-size limits, a private network namespace where the OS allows it, an
unprivileged uid when the framework runs as root, and an audit hook refusing sockets, new
processes, writes outside its directory and ctypes. See ``_sandbox_child.py``.

Running code is opt-in: callers must pass ``allow_code_execution=True`` through
``ensure_code_execution_allowed`` (benchmarks expose it as ``benchmark.allow_code_execution``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

CHILD = Path(__file__).with_name("_sandbox_child.py")
OUTPUT_LIMIT = 4000  # characters of stdout/stderr kept in a result


class CodeExecutionNotAllowed(RuntimeError):
    """Raised when model-written code would run without the explicit opt-in."""


def ensure_code_execution_allowed(allowed: bool) -> None:
    if not allowed:
        raise CodeExecutionNotAllowed(
            "this benchmark runs model-written code; it runs only in LATA's sandbox and only if you "
            "opt in: set benchmark.allow_code_execution=true (Python: allow_code_execution=True)"
        )


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 512  # RLIMIT_AS
    max_processes: int = 32  # RLIMIT_NPROC (for the sandbox's uid)
    max_file_mb: int = 16  # RLIMIT_FSIZE


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | killed
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str


def run_program(source: str, timeout_s: float = 5.0, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``source`` as a program; ``passed`` means it exited 0 within every limit."""
    limits = limits or SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s + 0.999)))
    workdir = Path(tempfile.mkdtemp(prefix="lata-sandbox-"))
    try:
        (workdir / "program.py").write_text(source)
        if os.getuid() == 0:  # the child drops to nobody: let it use its own directory
            os.chown(workdir, 65534, 65534)
            os.chown(workdir / "program.py", 65534, 65534)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir)}
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(CHILD), json.dumps(asdict(limits))],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
        try:
            out, err = proc.communicate(timeout=limits.timeout_s)
            status = None
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
            status = "timeout"
        _kill_group(proc.pid)  # stray children of a program that exited
        duration = time.monotonic() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    code = proc.returncode
    if status is None:
        status = "passed" if code == 0 else ("killed" if code is not None and code < 0 else "failed")
    return SandboxResult(passed=status == "passed", status=status, returncode=code, duration_s=duration,
                         stdout=out.decode(errors="replace")[-OUTPUT_LIMIT:],
                         stderr=err.decode(errors="replace")[-OUTPUT_LIMIT:])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_programs(sources: Sequence[str], timeout_s: float = 5.0, workers: int | None = None,
                 limits: SandboxLimits | None = None) -> list[SandboxResult]:
    """Run many programs, a few at a time (each still in its own sandboxed process)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, limits), sources))
