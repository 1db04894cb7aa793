"""What a point, a saved model and a cache entry are keyed by: the content of every input.

- ``checkpoint_digest``: every file of a checkpoint that LATA reads or copies into a merged
  checkpoint (``checkpoint_files``): the tensors (every byte), the index, config.json,
  generation config, tokenizer files, chat template, custom code; for a LoRA adapter its
  config and weights. By ``lata.digests.file_digest``: full content, remembered per file.
- ``code_version``: LATA's own code that computes numbers (docstrings and comments left out)
  and the versions of the libraries that compute them.
- ``content_key``: a short key of any JSON-able description (``lata.digests``).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
from pathlib import Path

from lata.checkpoints import (INDEX_FILE, SINGLE_FILE, WEIGHT_SUFFIXES, CheckpointError, read_index, resolve,
                              support_files)
from lata.digests import content_key, file_digest, tree_digests

__all__ = ["KEY_VERSION", "checkpoint_digest", "checkpoint_files", "code_version", "content_key", "input_digest"]

#: part of every key: bump it when what a key covers, or what is stored under it, changes
KEY_VERSION = 2

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def checkpoint_files(folder: Path) -> list[Path]:
    """The files of a checkpoint directory that LATA reads or copies: its weights (the shards
    an index lists and the index, else ``model.safetensors``, else any weight file there: what
    an unmerged evaluation loads), a LoRA adapter's two files, and its support files."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if (folder / ADAPTER_FILES[0]).exists():
        weights = [folder / name for name in ADAPTER_FILES if (folder / name).exists()]
    elif index.exists():
        weights = [index] + sorted(set(read_index(index).values()))
    elif (folder / SINGLE_FILE).exists():
        weights = [folder / SINGLE_FILE]
    else:
        weights = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return weights + [p for p in support_files(folder) if p not in weights]


def checkpoint_digest(path_or_id: str | os.PathLike) -> str:
    """A key of every byte of a checkpoint LATA reads or copies (``checkpoint_files``)."""
    folder = resolve(path_or_id)
    return content_key({"files": {p.relative_to(folder).as_posix(): _digest(p, folder) for p in checkpoint_files(folder)}})


def _digest(path: Path, folder: Path) -> str:
    try:
        return file_digest(path)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).replace(f"{path} ", "")
        raise CheckpointError(f"cannot read {path} (checkpoint {folder}): {why}") from None


def input_digest(path: str | os.PathLike, key: str) -> str | dict:
    """The digest of a file, or of every file under a directory, that the config names by ``key``;
    CheckpointError naming the key where it cannot be read."""
    path = Path(os.path.expanduser(str(path)))
    try:
        return tree_digests(path) if path.is_dir() else file_digest(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{key}={path} cannot be read: {exc}") from None


#: modules that only present results (tables, plots, logs, the command line): left out of the
#: code version, so that editing them keeps the results stored; the zoo is keyed by its build
PRESENTATION = ("cli.py", "__main__.py", "report.py", "plots.py", "logger.py", "zoo")
#: libraries whose versions change numbers (the merge, the model's forward pass, the metrics)
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "numba", "lm_eval", "datasets", "tokenizers",
             "accelerate")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A key of LATA's code that computes numbers and of the libraries' versions.

    Python modules count by their syntax tree without docstrings (an edited comment or
    docstring changes nothing); other files of the package (task YAMLs, architecture data) by
    their bytes; the config groups do not count (the resolved config is in every key)."""
    root = Path(__file__).parent
    parts = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (path.is_dir() or rel.parts[0] in PRESENTATION + ("conf",) or "__pycache__" in rel.parts
                or path.suffix in (".pyc", ".pyo")):
            continue
        data = path.read_bytes()
        parts[rel.as_posix()] = _syntax(data) if path.suffix == ".py" else data.decode("utf-8", "replace")
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return content_key({"code": content_key(parts), "libraries": versions})


def _syntax(source: bytes) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)
