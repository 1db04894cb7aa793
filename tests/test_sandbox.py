"""The sandbox contains hostile programs, scores them as failures and keeps going."""

import os
from pathlib import Path

import pytest

from lata.evaluation.sandbox import (CodeExecutionNotAllowed, SandboxLimits, ensure_code_execution_allowed,
                                     run_program, run_programs)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    good = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert good.passed and good.status == "passed" and good.stdout == "ok\n"
    bad = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_stopped_by_the_time_limit():
    result = run_program("while True:\n    pass", timeout_s=1.5)
    assert not result.passed and result.status in ("timeout", "killed") and result.duration_s < 5


def test_fork_bomb_is_denied():
    result = run_program("import os\nwhile True:\n    os.fork()", timeout_s=3)
    assert not result.passed


def test_fork_bomb_via_subprocess_is_denied():
    result = run_program("import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])")
    assert not result.passed and "not allowed" in result.stderr


def test_memory_hog_is_stopped():
    result = run_program("x = bytearray(4 * 1024 ** 3)\nprint('allocated')",
                         limits=SandboxLimits(timeout_s=5, memory_mb=256))
    assert not result.passed and "allocated" not in result.stdout and "MemoryError" in result.stderr


def test_writing_outside_its_directory_is_denied(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)
    result = run_program(f"open({str(target)!r}, 'w').write('gotcha')")
    assert not result.passed and not target.exists()
    inside = run_program("open('scratch.txt', 'w').write('fine')\nprint(open('scratch.txt').read())")
    assert inside.passed and inside.stdout == "fine\n"


def test_its_directory_is_fresh_and_removed():
    first = run_program("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))")
    cwd, listing = first.stdout.splitlines()
    assert listing == "['program.py']" and not Path(cwd).exists()


def test_network_connections_are_denied():
    result = run_program("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                         "s.connect(('127.0.0.1', 9))\nprint('connected')")
    assert not result.passed and "connected" not in result.stdout


def test_parents_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("LATA_TEST_SECRET", "hunter2")
    result = run_program("import os\nprint(sorted(os.environ))\nprint(os.environ.get('LATA_TEST_SECRET'))")
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[0] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    parent = run_program(f"print(open('/proc/{os.getpid()}/environ').read())")
    assert not parent.passed and "hunter2" not in parent.stdout


def test_evaluator_keeps_going_after_hostile_programs():
    programs = ["while True: pass", "import os\nos.fork()", "x = 1\nassert x == 1", "raise SystemExit(3)",
                "print('fine')"]
    results = run_programs(programs, timeout_s=1.5)
    assert [r.passed for r in results] == [False, False, True, False, True]


def test_code_execution_needs_explicit_opt_in():
    with pytest.raises(CodeExecutionNotAllowed, match="benchmark.allow_code_execution=true"):
        ensure_code_execution_allowed(False)
    ensure_code_execution_allowed(True)
