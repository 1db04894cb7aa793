"""Content digests: what every reused file is keyed by and checked against.

- ``file_digest``: a digest of every byte of a file (xxh3-128, ``xxh3:<hex>``), read at disk
  speed and remembered per file by its (device, inode, size, mtime_ns, ctime_ns): in this
  process, and on disk under ``memo_dir()`` (``use_memo_dir``) for other processes. A file whose
  stamp changed is always read again. A file of a Hugging Face hub cache snapshot is named by
  the hub's own hash of it (the name of the blob it links to: the sha256 of a large file, the
  git object id of a small one) and is not read.
- ``write_checked_json`` / ``read_checked_json``: a JSON document stored with the digest of its
  content; a damaged or truncated one is refused (``DamagedFile``) instead of being used.
- ``cached_build``: a directory built once, content-addressed, whose ``COMPLETE`` marker lists
  the digest of every file in it; a build whose files no longer match is built again.

Decisions:
- xxh3-128 (the ``xxhash`` package): a non-cryptographic hash many times faster than a disk,
  so a full-content digest costs one read of the file. It detects damage and edits, not an
  adversary crafting collisions.
- A stamp is remembered only once the file is older than ``RACY_NS``: a file written in the
  same clock tick as it was read could change again without changing its stamp (git's "racy"
  rule). Such a file is read again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import xxhash

from lata.io.atomic import atomic_directory, file_lock, write_json_atomic

log = logging.getLogger("lata")

CHUNK = 8 << 20  # bytes per read while hashing
RACY_NS = 2_000_000_000  # a file modified less than this long ago is not remembered
_HUB_BLOB = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")


class DamagedFile(ValueError):
    """A stored file that does not match its recorded digest (or cannot be parsed); names it."""


class NotRegularFile(ValueError):
    """A path that must be a regular file is a FIFO, a directory, a device..."""


def bytes_digest(data: bytes | memoryview) -> str:
    return "xxh3:" + xxhash.xxh3_128_hexdigest(data)


def new_hasher():
    """An incremental hasher whose ``digest_of(hasher)`` equals ``bytes_digest`` of all it was fed."""
    return xxhash.xxh3_128()


def digest_of(hasher) -> str:
    return "xxh3:" + hasher.hexdigest()


# --------------------------------------------------------------------------- files

_memo: dict[tuple, str] = {}
_memo_dir: Path | None = None


def use_memo_dir(directory: str | os.PathLike | None) -> None:
    """Remember file digests on disk in ``directory`` (None: in this process only)."""
    global _memo_dir
    _memo_dir = None if directory is None else Path(directory)


def memo_dir() -> Path | None:
    return _memo_dir


def regular_stat(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of a regular file (links followed); NotRegularFile or OSError otherwise."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "not a regular file"
        raise NotRegularFile(f"{path} is {kind}; LATA reads regular files only")
    return st


def _stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def hub_blob(path: str | os.PathLike) -> str | None:
    """The hub's hash of a file in a Hugging Face hub cache snapshot (``.../snapshots/<commit>/f``
    linking to ``../../blobs/<hash>``), else None."""
    path = Path(os.path.abspath(path))
    if not path.is_symlink():
        return None
    blob = path.resolve()
    if blob.parent.name != "blobs" or not _HUB_BLOB.match(blob.name):
        return None
    repo = blob.parent.parent
    if not any(p.parent.name == "snapshots" and p.parent.parent.resolve() == repo for p in path.parents):
        return None
    return blob.name


def file_digest(path: str | os.PathLike) -> str:
    """The digest of every byte of ``path`` (``hub:<hash>`` for a hub cache file), remembered
    by the file's stamp (module docstring). NotRegularFile or OSError where it cannot be read."""
    blob = hub_blob(path)
    if blob is not None:
        return f"hub:{blob}"
    st = regular_stat(path)
    stamp = _stamp(st)
    if stamp in _memo:
        return _memo[stamp]
    entry = _memo_entry(stamp)
    digest = _read_memo(entry, stamp) if entry is not None else None
    if digest is None:
        digest, st = _hash_file(path)
        stamp = _stamp(st)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            return digest
        if entry is not None:
            try:
                write_checked_json(_memo_entry(stamp), {"stamp": list(stamp), "digest": digest, "path": str(path)})
            except OSError:
                pass  # a memo that cannot be written costs a read next time, nothing else
    _memo[stamp] = digest
    return digest


#: files read and hashed at once by ``file_digests`` (a disk or page cache serves several readers faster)
HASH_THREADS = min(8, os.cpu_count() or 1)


def file_digests(paths: list, digest: Callable[[Any], str] = file_digest) -> list[str]:
    """``digest`` (``file_digest``) of each path, in order; files not remembered are read on up to
    ``HASH_THREADS`` threads at once."""
    paths = list(paths)
    if len(paths) < 2 or HASH_THREADS < 2:
        return [digest(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), HASH_THREADS), thread_name_prefix="lata-digest") as pool:
        return list(pool.map(digest, paths))


def _memo_entry(stamp: tuple) -> Path | None:
    return None if _memo_dir is None else _memo_dir / f"{stamp[0]:x}-{stamp[1]:x}.json"


def _read_memo(entry: Path, stamp: tuple) -> str | None:
    try:
        data = read_checked_json(entry)
    except FileNotFoundError:
        return None
    except (OSError, DamagedFile):
        return None  # read the file again; the entry is rewritten
    if not isinstance(data, dict) or data.get("stamp") != list(stamp) or not isinstance(data.get("digest"), str):
        return None
    return data["digest"]


def _hash_file(path: str | os.PathLike, tries: int = 3) -> tuple[str, os.stat_result]:
    """(digest, the stat it belongs to): read whole; read again where the file changed meanwhile."""
    for _ in range(tries):
        fd = os.open(path, os.O_RDONLY)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):  # replaced by something else since it was checked
                raise NotRegularFile(f"{path} is not a regular file; LATA reads regular files only")
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            hasher = new_hasher()
            buffer = bytearray(min(CHUNK, max(before.st_size, 1)))
            view = memoryview(buffer)
            while True:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                hasher.update(view[:n])
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if _stamp(before) == _stamp(after):
            return digest_of(hasher), after
    raise OSError(f"{path} kept changing while it was read; is another program writing it?")


def tree_digests(root: str | os.PathLike) -> dict[str, str]:
    """{relative path: file_digest} of every file under ``root`` (links followed), sorted."""
    root = Path(root)
    return {path.relative_to(root).as_posix(): file_digest(path) for path in sorted(root.rglob("*"))
            if not path.is_dir()}


def verify_files(root: Path, expected: dict[str, str]) -> str | None:
    """None where every file of ``expected`` (relative path -> digest) is under ``root`` with that
    digest, else what is wrong, naming the file."""
    if not isinstance(expected, dict) or not expected:
        return "no digests recorded"
    for rel, digest in expected.items():
        path = root / rel
        try:
            actual = file_digest(path)
        except (OSError, ValueError) as exc:
            return f"{path}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
        if actual != digest:
            return f"{path} does not match its recorded digest"
    return None


# --------------------------------------------------------------------------- checked JSON

def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def write_checked_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` atomically with the digest of its canonical JSON (``read_checked_json``)."""
    return write_json_atomic(path, {"digest": bytes_digest(_canonical(data)), "data": data})


def read_checked_json(path: str | os.PathLike) -> Any:
    """The data ``write_checked_json`` stored; DamagedFile naming ``path`` where it is not whole
    (FileNotFoundError where it is missing)."""
    try:
        regular_stat(path)
        document = json.loads(Path(path).read_bytes())
    except (FileNotFoundError, PermissionError):
        raise
    except (OSError, ValueError) as exc:
        raise DamagedFile(f"{path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(document, dict) or set(document) != {"digest", "data"}:
        raise DamagedFile(f"{path} is not a checked JSON document")
    if bytes_digest(_canonical(document["data"])) != document["digest"]:
        raise DamagedFile(f"{path} does not match its recorded digest")
    return document["data"]


# --------------------------------------------------------------------------- content-addressed builds

BUILD_MARKER = "COMPLETE"


def content_key(data: Any, length: int = 20) -> str:
    """A short stable key of JSON-able ``data`` (hex characters of its canonical sha256)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def build_key(kind: str, config: dict, code_version: str) -> str:
    """The key of a cached build (12 hex characters): what ``cached_build`` names its directory by."""
    return content_key({"kind": kind, "config": config, "code_version": code_version}, length=12)


def build_problem(path: Path, key: str | None = None) -> str | None:
    """None where ``path`` holds a whole build (for ``key``, when given): a readable marker whose
    file digests all match; else what is wrong."""
    try:
        marker = read_checked_json(Path(path) / BUILD_MARKER)
    except FileNotFoundError:
        return "missing"
    except (OSError, DamagedFile) as exc:
        return str(exc)
    if not isinstance(marker, dict) or (key is not None and marker.get("key") != key):
        return "built for another key"
    return verify_files(Path(path), marker.get("files"))


def cached_build(cache_dir: str | os.PathLike, kind: str, config: dict,
                 build: Callable[[Path], None], code_version: str) -> Path:
    """Return ``cache_dir/<kind>-<key>``, calling ``build(tmp_dir)`` first unless it holds a whole
    build whose every file matches the digest its marker records.

    A build lands there only when whole: ``build`` writes everything into the temporary
    directory it is given, a ``COMPLETE`` marker (the key, the build inputs and every file's
    digest) is written last, and the directory is renamed into place (``atomic_directory``). A
    directory whose marker is missing or whose files do not match it is built again (with a
    warning naming the file). Concurrent callers for the same key serialise on a lock file and
    the later ones reuse the first one's result.
    """
    cache_dir = Path(cache_dir)
    key = build_key(kind, config, code_version)
    target = cache_dir / f"{kind}-{key}"
    if build_problem(target, key) is None:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f".{kind}-{key}.lock"):
        problem = build_problem(target, key)  # built by another process while we waited?
        if problem is None:
            return target
        if problem != "missing":
            log.warning("cached build %s is damaged (%s): building it again", target, problem)
        with atomic_directory(target) as tmp:
            build(tmp)
            marker = {"kind": kind, "key": key, "config": config, "code_version": code_version,
                      "files": tree_digests(tmp)}
            write_checked_json(tmp / BUILD_MARKER, marker)
    return target
