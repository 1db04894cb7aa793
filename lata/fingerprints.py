"""Content keys: what the results store (``lata.store``) and the disk caches (``lata.caches``)
are keyed by, so that a retrained checkpoint at the same path never reuses stale files.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from lata.checkpoints import resolve

#: part of every key: bump it when what a key covers, or what is stored under it, changes
KEY_VERSION = 1
_SAMPLES, _BLOCK = 16, 1 << 16

_fingerprints: dict[tuple, str] = {}


def fingerprint(path_or_id: str | os.PathLike) -> str:
    """A content fingerprint of a checkpoint: sha256 over each safetensors file's name, size,
    header (every tensor's name, dtype, shape and offsets) and 16 evenly spaced 64 KiB blocks
    (and a LoRA adapter's ``adapter_config.json``).

    Decision: a sampled hash, not a full one. It changes whenever shapes or headers change and,
    for retrained weights, whenever any sampled block does; hashing all of a 70B family would cost
    minutes per sweep. Memoised per process by (path, size, mtime).
    """
    folder = resolve(path_or_id)
    files = sorted(folder.glob("*.safetensors"))
    adapter = folder / "adapter_config.json"  # a LoRA adapter: its scaling lives there
    watched = files + ([adapter] if adapter.is_file() else [])
    stamp = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in watched))
    if stamp not in _fingerprints:
        digest = hashlib.sha256()
        if adapter.is_file():
            digest.update(adapter.read_bytes())
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(header_len))
                for i in range(_SAMPLES):
                    f.seek((size * i) // _SAMPLES)
                    digest.update(f.read(_BLOCK))
        _fingerprints[stamp] = digest.hexdigest()
    return _fingerprints[stamp]


def content_key(data: Any) -> str:
    """A short stable key of JSON-able ``data`` (20 hex characters of its canonical sha256)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]
