"""Where a merged checkpoint may be written, and the mark that says LATA wrote it.

The rules, checked before any tensor is read (``check_target``) and again just before the new
checkpoint is renamed into place:

- **Inputs are never touched.** The target may not be, lie inside, or contain an input
  checkpoint (paths resolved, symbolic links followed), nor be or contain the current
  directory or another directory the run needs (``protected``). This holds for every
  ``overwrite`` mode.
- **overwrite** ``false``: the target must be missing or empty. ``true``: an existing target is
  replaced only when LATA wrote it: its marker ``lata_merge.json`` lists every file in it.
  ``force``: any directory but the protected ones.
- **The place is writable:** every existing part of the path is a directory and the nearest
  existing one takes a new file (a probe file is made and removed: permissions alone do not
  say it for root, read-only mounts or /proc); the file system has room for the planned
  output (``check_space``).
- **One writer per target:** ``writer_lock`` holds ``.NAME.lock`` beside the target from the
  check to the rename; a second run fails at once, naming the holder.

The marker also records what was merged, the ``model_key`` that identifies the bytes written
and every file's size and content digest (``holds_model``), so that a resumed sweep point knows
whether a directory already holds its model whole; a stored model is checked against the same
digests as it is copied (``copy_checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from lata.io.atomic import atomic_directory, file_lock, write_json_atomic
from lata.io.digests import (CHUNK, DamagedFile, NotRegularFile, digest_of, file_digest, new_hasher, regular_stat,
                             verify_files)

log = logging.getLogger("lata")

MARKER = "lata_merge.json"
#: written by this version: every file's size and content digest; read: also lata-merge/1
#: (sizes only: a directory LATA wrote, which overwrite=true may replace, but no model to reuse)
MARKER_FORMAT = "lata-merge/2"
MARKER_FORMATS = ("lata-merge/1", MARKER_FORMAT)


class OutputError(ValueError):
    """An output path that may not or cannot be written; the message names it."""


def overwrite_mode(value: Any) -> bool | str:
    """``overwrite`` as False, True or "force" (also from the strings "true"/"false")."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text == "force":
        return "force"
    raise OutputError(f"overwrite={value!r} is not allowed; choose one of: false, true, force")


def absolute(target: str | os.PathLike) -> Path:
    """``target`` as the absolute path every check and lock uses (``~`` expanded, links kept)."""
    return Path(os.path.abspath(os.path.expanduser(str(target))))


def _nearest_existing(path: Path) -> Path:
    """The longest existing prefix of ``path`` (absolute); refuses a prefix that is a file."""
    for part in [path, *path.parents]:
        if os.path.lexists(part):
            if not part.is_dir():
                raise OutputError(f"cannot write {path}: {part} is a file, not a directory")
            return part
    return Path("/")


def _related(a: Path, b: Path) -> str | None:
    """How ``a`` relates to ``b`` (both resolved): 'is', 'lies inside', 'contains', or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def _probe(directory: Path) -> None:
    """Make and remove a file in ``directory``: the one sure test that it takes new files."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".lata-probe-")
    except OSError as exc:
        raise OutputError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(name)


def _marker(directory: Path) -> dict | None:
    try:
        regular_stat(directory / MARKER)
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") in MARKER_FORMATS else None


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` that its LATA marker does not list (all of them where none)."""
    entries = sorted(p.name for p in directory.iterdir())
    marker = _marker(directory)
    files = marker.get("files") if marker else None
    listed = set(files) | {MARKER} if isinstance(files, dict) else set()
    return [e for e in entries if e not in listed]


def check_target(target: str | os.PathLike, *, overwrite: Any = False,
                 inputs: Mapping[str, str | os.PathLike] | None = None,
                 protected: Mapping[str, str | os.PathLike] | None = None, key: str = "save_model",
                 defer_lata: bool = False) -> Path:
    """Check that ``target`` may be written as a merged checkpoint (the rules above, without the
    free space); return it as an absolute path. ``inputs``/``protected``: name -> path (the
    current directory is always protected); an input that is not a local path (a hub id) is
    skipped. ``key`` names the setting in messages.
    ``defer_lata``: a directory LATA wrote passes even with overwrite=false, for a caller that
    checks again once it knows whether the directory already holds the model it would write.
    """
    mode = overwrite_mode(overwrite)
    path = absolute(target)
    if path.is_symlink():
        raise OutputError(f"{key}={path} is a symbolic link; give the directory itself")
    existing = _nearest_existing(path)
    resolved = path.resolve()
    checks = [(f"input checkpoint {role}", p) for role, p in (inputs or {}).items()]
    checks += [(what, p) for what, p in {"current directory": Path.cwd(), **(protected or {})}.items()]
    for what, other in checks:
        other = absolute(other)
        if what.startswith("input") and not other.exists():
            continue  # a hub id: its local copy is checked once resolved
        relation = _related(resolved, other.resolve())
        if relation is not None and (what.startswith("input") or relation != "lies inside"):
            why = "LATA never writes over its inputs" if what.startswith("input") else "the run needs it"
            raise OutputError(f"{key}={target} {relation} the {what} ({other.resolve()}): {why}; "
                              f"choose another directory")
    if path.is_dir() and any(path.iterdir()):
        foreign = _foreign_entries(path)
        if mode is False and not (defer_lata and not foreign):
            if not foreign:
                raise OutputError(f"output directory {path} holds a checkpoint LATA wrote; "
                                  f"choose another or set overwrite=true to replace it")
            raise OutputError(f"output directory {path} is not empty; choose another or set overwrite=true "
                              f"(replaces a directory LATA wrote)")
        if foreign and mode is True:
            what = "was not written by LATA" if _marker(path) is None else "holds files LATA did not write"
            raise OutputError(f"output directory {path} {what} ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); overwrite=true only replaces LATA's "
                              f"own outputs: choose another directory, or set overwrite=force to replace it")
    _probe(path.parent if path.parent.is_dir() else existing)
    return path


def check_outside_inputs(directories: Mapping[str, str | os.PathLike],
                         inputs: Mapping[str, str | os.PathLike]) -> None:
    """Refuse a directory LATA writes (run, results, cache: name -> path) that is or lies inside
    an input checkpoint (paths resolved, links followed; an input that is not a local path, a
    hub id, is skipped): checkpoints are read, never written."""
    for role, path in inputs.items():
        other = absolute(path)
        if not other.is_dir():
            continue
        other = other.resolve()
        for what, directory in directories.items():
            mine = absolute(directory).resolve()
            if mine == other or other in mine.parents:
                raise OutputError(f"the {what} {directory} {_related(mine, other)} the input checkpoint {role} "
                                  f"({other}): LATA never writes into its inputs; choose another directory")


def check_space(target: str | os.PathLike, nbytes: int, key: str = "save_model") -> None:
    """Refuse when the file system of ``target`` reports less free space than ``nbytes``."""
    where = _nearest_existing(absolute(target))
    try:
        stat = os.statvfs(where)
    except (OSError, AttributeError):
        return  # the file system does not say: the write will tell
    free = stat.f_bavail * stat.f_frsize
    if stat.f_blocks and free < nbytes:
        raise OutputError(f"{key}={target}: the merged checkpoint needs {_size(nbytes)}, but the file system of "
                          f"{where} has {_size(free)} free")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


_held: dict[str, int] = {}  # lock files this process holds -> nesting depth


@contextlib.contextmanager
def writer_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``target`` for the block (re-entrant within a process); where
    another process holds it, raise OutputError naming that process at once."""
    path = absolute(target)
    lock = path.parent / f".{path.name}.lock"
    if str(lock) in _held:
        _held[str(lock)] += 1
        try:
            yield
        finally:
            _held[str(lock)] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(lock, wait=False, remove=True) as fd:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            _held[str(lock)] = 1
            try:
                yield
            finally:
                del _held[str(lock)]
    except BlockingIOError:
        try:
            holder = lock.read_text().split()
        except OSError:
            holder = []
        who = f"PID {holder[0]} on {holder[1]}" if len(holder) == 2 else "another process"
        raise OutputError(f"another lata run ({who}) is writing {path} now; wait for it to end or choose "
                          f"another save_model") from None


def write_marker(directory: Path, record: Mapping[str, Any], digests: Mapping[str, str] | None = None) -> None:
    """Write the marker into a finished checkpoint directory (last, before its rename): ``record``
    and every file's size and content digest (``digests``: those already known, e.g. computed
    as the shards were written; the others are read)."""
    digests = dict(digests or {})
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name != MARKER and path.is_file():
            files[path.name] = {"size": path.stat().st_size,
                                "digest": digests.get(path.name) or file_digest(path)}
    write_json_atomic(directory / MARKER, {"format": MARKER_FORMAT, **record, "files": files})


def _listed(marker: dict) -> dict[str, dict] | None:
    """{name: {"size", "digest"}} of a marker that records digests, else None."""
    files = marker.get("files")
    if not isinstance(files, dict) or not files or not all(
            k not in ("", ".", "..", MARKER) and "/" not in k and "\0" not in k  # a name in the directory
            and isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("digest"), str)
            for k, v in files.items()):
        return None
    return files


def holds_model(directory: str | os.PathLike, model_key: str, verify: bool = True) -> bool:
    """Whether ``directory`` is a whole checkpoint LATA wrote with ``model_key``: its marker has
    that key and every file it lists is there with its size and (``verify``) its content digest.
    A directory that has the key but does not match is named in a warning."""
    directory = absolute(directory)
    marker = _marker(directory) if directory.is_dir() else None
    files = _listed(marker) if marker is not None and marker.get("model_key") == model_key else None
    if files is None:
        return False
    for name, entry in files.items():
        try:
            sized = (directory / name).stat().st_size == entry["size"]
        except (OSError, ValueError):
            sized = False
        if not sized:
            log.warning("%s does not match the record of the merged model in %s (%s)", directory / name, directory,
                        MARKER)
            return False
    problem = verify_files(directory, {name: entry["digest"] for name, entry in files.items()}) if verify else None
    if problem is not None:
        log.warning("%s (the record of the merged model in %s, %s)", problem, directory, MARKER)
        return False
    return True


def copy_checkpoint(source: Path, target: str | os.PathLike, check) -> Path:
    """Copy a whole checkpoint directory LATA wrote into ``target`` atomically (``check`` as
    for ``atomic_directory``), under the writer lock. Every file is checked against the digest
    its marker records as it is copied: where one does not match, nothing is written to
    ``target`` and DamagedFile names the file."""
    marker = _marker(Path(source))
    files = _listed(marker) if marker is not None else None
    if files is None:
        raise DamagedFile(f"{Path(source) / MARKER} records no content digests")
    with writer_lock(target), atomic_directory(target, check=check) as tmp:
        for name, entry in files.items():
            _copy_checked(Path(source) / name, tmp / name, entry["digest"])
        shutil.copyfile(Path(source) / MARKER, tmp / MARKER)
    return Path(target)


def _copy_checked(source: Path, target: Path, digest: str) -> None:
    hasher = new_hasher()
    try:
        regular_stat(source)
        with open(source, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK):
                hasher.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise DamagedFile(f"{source} is missing") from None
    except NotRegularFile as exc:
        raise DamagedFile(str(exc)) from None
    if digest_of(hasher) != digest:
        raise DamagedFile(f"{source} does not match its recorded digest")
