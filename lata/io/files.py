"""Reading files LATA did not write, and naming them in messages.

Every input file is checked before it is opened: a regular file (``regular_file``; opening a
FIFO or a device blocks or reads forever), of bounded size (``read_bounded``), and, for JSON,
valid JSON (``read_json``). A file that fails is refused with a one-line ``CheckpointError``
naming it. The message helpers (``one_line``, ``shown``, ``json_kind``, ``quoted``) put what
was read into such a message: one line, cut short, never walked whole.
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path

from lata.io.digests import NotRegularFile, regular_stat

#: the largest JSON file read (config.json, an index, adapter_config.json)
MAX_JSON_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, malformed or incompatible; the message names it."""


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (links followed); CheckpointError naming it otherwise.

    Called before a file is opened: opening a FIFO or a device blocks or reads forever."""
    path = Path(path)
    try:
        regular_stat(path)
    except NotRegularFile as exc:
        raise CheckpointError(f"{what} {exc}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise CheckpointError(f"cannot read {what} {path}: {why}") from None
    return path


def one_line(exc_or_text) -> str:
    """An exception's message (or a text) on one line, its whitespace runs made single spaces,
    at most 300 characters."""
    text = " ".join(str(exc_or_text).split())
    return text if len(text) <= 300 else text[:297] + "..."


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def shown(value) -> str:
    """A value read from a file as a message shows it: Python's repr, shortened, on one line
    (nested and shared structures are cut off, never walked whole)."""
    return one_line(_REPR.repr(value))


def json_kind(value) -> str:
    """What a parsed JSON value is, for a message: 'a JSON list', 'a JSON number', ..."""
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "JSON null" if value is None else f"a JSON {kinds.get(type(value), type(value).__name__)}"


def quoted(name: str) -> str:
    """A name read from a file, quoted for a message ('name'; repr where it is not printable)."""
    return f"'{name}'" if isinstance(name, str) and name.isprintable() else shown(name)


def read_bounded(file: str | os.PathLike, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; CheckpointError naming it otherwise."""
    file = regular_file(file, what)
    try:
        size = file.stat().st_size
        if size > limit:
            raise CheckpointError(f"{what} {file} has {size} bytes, more than the {limit} LATA reads from it")
        return file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {file}: {exc.strerror or one_line(exc)}") from None


def read_json(file: str | os.PathLike, what: str = "file"):
    """The value of a JSON file (UTF-8, -16 or -32); CheckpointError naming the file where it is
    not a regular file, holds more than ``MAX_JSON_BYTES``, or is not JSON."""
    raw = read_bounded(file, what, MAX_JSON_BYTES)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise CheckpointError(f"{file} is not valid JSON: {one_line(exc)}") from None
