"""Atomic outputs: whole or nothing, with ordinary file permissions."""

import os
import stat

import pytest

from lata.io.atomic import atomic_directory, atomic_file, write_text_atomic


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_ordinary_permissions_not_a_temp_files_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = write_text_atomic(tmp_path / "a" / "summary.json", "{}\n")
    assert path.read_text() == "{}\n"
    assert _mode(path) == 0o666 & ~mask == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "metrics.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_directory_leaves_the_old_one(tmp_path):
    target = tmp_path / "merged"
    with atomic_directory(target) as d:
        (d / "model.safetensors").write_text("whole")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "model.safetensors").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "model.safetensors").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2", "two-renames"])
def test_a_replacement_is_whole_with_or_without_the_atomic_swap(tmp_path, monkeypatch, swap):
    from lata.io import atomic

    swapped = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: swapped.append(real(a, b)) or swapped[-1])
    if not swap:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    target = tmp_path / "merged"
    with atomic_directory(target) as d:
        (d / "model.safetensors").write_text("old")
    with atomic_directory(target) as d:
        (d / "model.safetensors").write_text("new")
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the old one removed
    assert swapped == [swap]  # Linux swaps in one step; elsewhere two renames


def test_paths_with_a_tilde_are_checked_and_locked_where_they_point(tmp_path, monkeypatch):
    from lata.io.outputs import absolute, check_target, writer_lock

    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_target("~/merged") == absolute("~/merged") == tmp_path / "merged"
    with writer_lock("~/merged"):
        assert (tmp_path / ".merged.lock").is_file()
    assert not (tmp_path / ".merged.lock").exists()
