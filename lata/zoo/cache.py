"""A content-addressed cache of built directories.

A build lands in ``cache_dir/<kind>-<key>`` only when whole: it is built in a temporary sibling,
a ``COMPLETE`` marker is written last, and the directory is renamed into place. A directory
without the marker is never returned; it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from lata.atomic import atomic_directory, file_lock

MARKER = "COMPLETE"


def cache_key(kind: str, config: dict, code_version: str) -> str:
    """First 12 hex characters of the sha256 of the canonical JSON of the build inputs."""
    blob = json.dumps({"kind": kind, "config": config, "code_version": code_version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def is_complete(path: Path, key: str | None = None) -> bool:
    """Whether ``path`` holds a readable ``COMPLETE`` marker (for ``key``, when given)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return key is None or (isinstance(marker, dict) and marker.get("key") == key)


def cached_build(cache_dir: str | os.PathLike, kind: str, config: dict,
                 build: Callable[[Path], None], code_version: str) -> Path:
    """Return ``cache_dir/<kind>-<key>``, calling ``build(tmp_dir)`` first if it is not complete.

    ``build`` writes everything into the directory it is given; the result is moved into place
    atomically with a ``COMPLETE`` marker. Concurrent callers for the same key serialise on a
    lock file and the later ones reuse the first one's result.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(kind, config, code_version)
    target = cache_dir / f"{kind}-{key}"
    if is_complete(target, key):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / f".{kind}-{key}.lock"):
        if is_complete(target, key):  # built by another process while we waited
            return target
        marker: dict[str, Any] = {"kind": kind, "key": key, "config": config,
                                  "code_version": code_version}
        with atomic_directory(target, overwrite=True) as tmp:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return target
