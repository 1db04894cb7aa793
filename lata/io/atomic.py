"""Atomic outputs: write to a temporary sibling, rename into place only when whole.

A reader therefore sees either nothing, the previous complete output, or the new complete
output; never a half-written file or directory.

Temporary siblings are named ``.NAME.tmp-PID-...`` after the process writing them. A run that
is killed (SIGKILL, a node lost) cannot remove its own; the next ``atomic_directory`` write to
the same place removes those whose process is gone (``clean_leftovers``). Temporary files of
``atomic_file`` (small JSON and text files) are not swept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("lata")


def _temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``target`` (``.NAME.tmp-PID-*``, files or directories)
    whose writing process no longer runs; return them.

    Decision: a process is judged by its PID on this machine. A sibling of a live process, or of
    a PID now reused by another process, is left alone (never a live writer's file).
    """
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-(\d+)-")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
        log.info("removed %s, left by a run that was killed", path)
    return removed


def libc_function(name: str, *argtypes):
    """A C library function by ctypes (the GIL is let go during calls; ``int`` result, errno
    kept), or None where there is none. Defined here, with the standard library only, so that
    this module stays free of torch; ``lata.accel.compute`` and ``lata.io.pagecache`` use it too."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = libc_function("renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, check: Callable[[Path], Any] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` when the block succeeds.

    ``check(target)``, the caller's output policy (a user's directory: ``lata.io.outputs.check_target``),
    runs before the temporary directory is made and again just before the rename, so a target
    that changed meanwhile is still refused; without one, ``target`` is a directory the caller
    owns (a store entry, a cached build) and only a non-directory there is refused. On an exception (an interrupt included) the temporary
    directory is removed and ``target`` is untouched. An existing ``target`` is swapped with the
    new directory in one atomic step where Linux allows it, then removed.
    """
    target = Path(target)
    check = check or _owned_directory
    check(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        check(target)
        if target.exists() and _exchange(tmp, target):
            old = tmp  # now holds the previous target
        else:
            old = None
            if target.exists():
                old = _temp_sibling(target)
                os.rename(target, old)
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owned_directory(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output path {target} exists and is not a directory")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block succeeds.

    The file gets the permissions of an ordinary new file (0666 less the umask), not the 0600
    of a temporary file. On an exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file via a temporary file in the same directory and ``os.replace``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True, remove: bool = False) -> Iterator[int]:
    """An exclusive advisory lock (``flock``) on ``path``, created if missing, held for the block;
    yields the lock file's descriptor.

    ``wait=False``: raise ``BlockingIOError`` at once where another process holds it.
    ``remove=True``: the lock file is deleted when the block ends. Decision: a process that
    opened the file before it was deleted and locks it afterwards would hold a lock on a file
    no one else sees, so after locking, the file is compared with what ``path`` names now, and
    locked again where they differ.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield fd
    finally:
        if remove:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)  # releases the lock
