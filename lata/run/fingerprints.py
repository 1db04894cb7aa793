"""What a point, a saved model and a cache entry are keyed by: the content of every input.

- ``checkpoint_digest``: every file of a checkpoint that LATA reads or copies into a merged
  checkpoint (``checkpoint_files``): the tensors (every byte), the index, config.json,
  generation config, tokenizer files, chat template, custom code; for a LoRA adapter its
  config and weights. By ``lata.io.digests.file_digest``: full content, remembered per file.
- ``code_version``: LATA's own code that computes numbers (docstrings and comments left out)
  and the versions of the libraries that compute them.
- ``content_key``: a short key of any JSON-able description (``lata.io.digests``).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
from pathlib import Path

from lata.io.adapters import CONFIG_FILE as ADAPTER_CONFIG, WEIGHTS_FILE as ADAPTER_WEIGHTS, is_adapter
from lata.io.checkpoints import resolve
from lata.io.files import CheckpointError
from lata.io.shards import support_files
from lata.io.tensorfiles import INDEX_FILE, SINGLE_FILE, WEIGHT_SUFFIXES, read_index
from lata.io.digests import (DamagedFile, content_key, file_digest, file_digests, memo_dir, read_checked_json,
                          tree_digests, write_checked_json)

__all__ = ["KEY_VERSION", "checkpoint_digest", "checkpoint_digests", "checkpoint_files", "code_version",
           "content_key", "input_digest"]

#: part of every key: bump it when what a key covers, or what is stored under it, changes
KEY_VERSION = 2

def checkpoint_files(folder: Path) -> list[Path]:
    """The files of a checkpoint directory that LATA reads or copies: its weights (the shards
    an index lists and the index, else ``model.safetensors``, else any weight file there: what
    an unmerged evaluation loads), a LoRA adapter's two files, and its support files."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if is_adapter(folder):
        weights = [folder / name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (folder / name).exists()]
    elif index.exists():
        weights = [index] + sorted(set(read_index(index).values()))
    elif (folder / SINGLE_FILE).exists():
        weights = [folder / SINGLE_FILE]
    else:
        weights = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return weights + [p for p in support_files(folder) if p not in weights]


def checkpoint_digest(path_or_id: str | os.PathLike) -> str:
    """A key of every byte of a checkpoint LATA reads or copies (``checkpoint_files``)."""
    return checkpoint_digests({"checkpoint": path_or_id})["checkpoint"]


def checkpoint_digests(checkpoints: dict[str, str | os.PathLike]) -> dict[str, str]:
    """{role: ``checkpoint_digest``} of several checkpoints, their files hashed at once
    (``lata.io.digests.file_digests``)."""
    folders = {role: resolve(path) for role, path in checkpoints.items()}
    listed = [(role, folder, path) for role, folder in folders.items() for path in checkpoint_files(folder)]
    digests = file_digests(listed, lambda item: _digest(item[2], item[1]))
    files: dict[str, dict[str, str]] = {role: {} for role in folders}
    for (role, folder, path), digest in zip(listed, digests):
        files[role][path.relative_to(folder).as_posix()] = digest
    return {role: content_key({"files": files[role]}) for role in folders}


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
PRESENTATION = ("cli.py", "__main__.py", "results", "zoo")
#: libraries whose versions change numbers (the merge, the model's forward pass, the metrics)
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "numba", "lm_eval", "datasets", "tokenizers",
             "accelerate")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A key of LATA's code that computes numbers and of the libraries' versions.

    Python modules count by their syntax tree without docstrings (an edited comment or
    docstring changes nothing); other files of the package (task YAMLs, architecture data) by
    their bytes; the config groups do not count (the resolved config is in every key). The key
    of the code is remembered in the digest memo (``lata.io.digests.memo_dir``) by every file's
    path, size and mtime, so parsing happens once per change of the code."""
    root = Path(__file__).resolve().parents[1]
    sources = [p for p in sorted(root.rglob("*")) if _counts(p.relative_to(root)) and p.is_file()]
    stamps = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    memo = memo_dir() / f"code-{content_key(stamps)}.json" if memo_dir() is not None else None
    code = None
    if memo is not None:
        try:
            code = read_checked_json(memo)
        except (OSError, DamagedFile):
            code = None
    if not isinstance(code, str):
        code = content_key({p.relative_to(root).as_posix(): _syntax(p.read_bytes()) if p.suffix == ".py"
                            else p.read_bytes().decode("utf-8", "replace") for p in sources})
        if memo is not None:
            try:
                write_checked_json(memo, code)
            except OSError:
                pass
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return content_key({"code": code, "libraries": versions})


def _counts(rel: Path) -> bool:
    """Whether a file of the package counts in the code version."""
    return (rel.parts[0] not in PRESENTATION + ("conf",) and "__pycache__" not in rel.parts
            and rel.suffix not in (".pyc", ".pyo"))


def _syntax(source: bytes) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)
