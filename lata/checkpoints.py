"""Checkpoints on disk: a lazy tensor reader and an atomic sharded writer.

A checkpoint is a Hugging Face model directory (or hub id) holding ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``. Tensors are read one at a time from the
safetensors memory map; nothing is loaded until asked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lata.atomic import write_json_atomic

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
# Files fetched from the hub besides weights: config, generation config, tokenizer, templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, malformed or incompatible; the message names it."""


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id downloaded (weights as safetensors only) to the HF cache.

    Decision: a string that exists locally, or starts with '/', '.', or '~', is a path; a string
    of the form ``owner/name`` that is not a local path is a hub id.
    """
    text = os.path.expanduser(str(path_or_id))
    local = Path(text)
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; a checkpoint is a model directory")
        return local
    if text.startswith(("/", ".", "~")) or not _HUB_ID.match(text):
        raise CheckpointError(f"checkpoint directory {local} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, gated, missing repo...
        raise CheckpointError(
            f"'{text}' is neither a local directory nor a hub model that could be fetched: {exc}"
        ) from exc


class Checkpoint:
    """Lazy view of one checkpoint's tensors (names, shapes, dtypes, values)."""

    def __init__(self, path_or_id: str | os.PathLike, role: str = "model"):
        self.role = role
        self.source = str(path_or_id)
        self.path = resolve(path_or_id)
        self.config = self._read_config()
        self._handles: dict[Path, object] = {}
        self.files = self._tensor_files()  # tensor name -> shard path
        self._headers: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            handle = self._open(file)
            for name in handle.keys():
                if self.files.get(name) == file:
                    sl = handle.get_slice(name)
                    self._headers[name] = (tuple(sl.get_shape()), sl.get_dtype())
        missing = sorted(set(self.files) - set(self._headers))
        if missing:
            raise CheckpointError(
                f"{self.path / INDEX_FILE} lists tensor '{missing[0]}' in "
                f"{self.files[missing[0]].name}, which does not contain it"
            )

    def __repr__(self) -> str:
        return f"Checkpoint({self.role}: {self.path})"

    def _read_config(self) -> dict:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.role} checkpoint {self.path} has no config.json")
        try:
            return json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc

    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} names shard {shard.name}, which is missing")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        other = sorted(p.name for p in self.path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        hint = f" (found {', '.join(other)}; convert to safetensors)" if other else ""
        raise CheckpointError(f"{self.role} checkpoint {self.path} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"cannot read safetensors file {file}: {exc}") from exc
        return self._handles[file]

    @property
    def names(self) -> list[str]:
        return list(self._headers)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[name][0]

    def dtype_name(self, name: str) -> str:
        """safetensors dtype string, e.g. 'F32', 'BF16'."""
        return self._headers[name][1]

    def nbytes(self, name: str) -> int:
        numel = 1
        for d in self.shape(name):
            numel *= d
        return numel * _DTYPE_BYTES.get(self.dtype_name(name), 4)

    def get(self, name: str, check_finite: bool = False) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype); optionally refuse NaN/Inf, naming file and tensor."""
        file = self.files[name]
        try:
            tensor = self._open(file).get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {file}: {exc}") from exc
        if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise CheckpointError(f"tensor '{name}' in {file} ({self.role}) contains {bad} values")
        return tensor

    def close(self) -> None:
        self._handles.clear()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_TO_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                         "F64": torch.float64}


def torch_dtype_of(safetensors_dtype: str) -> torch.dtype | None:
    return _SAFETENSORS_TO_TORCH.get(safetensors_dtype)


class ShardedWriter:
    """Writes tensors into size-bounded safetensors shards inside a (temporary) directory.

    Tensors are buffered until a shard reaches ``max_shard_bytes`` and then written, so memory
    holds at most one shard. ``finish`` names the shards as Hugging Face does and writes the
    index; the caller renames the directory into place (see ``lata.atomic``).
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[Path]:
        self._flush()
        count = len(self._shards)
        if count == 0:
            raise CheckpointError("no tensors were written")
        if count == 1:
            final = [self._shards[0][0].rename(self.directory / SINGLE_FILE)]
            return final
        weight_map, final = {}, []
        for i, (path, names) in enumerate(self._shards):
            target = self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(target)
            final.append(target)
            weight_map.update({n: target.name for n in names})
        write_json_atomic(self.directory / INDEX_FILE,
                          {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return final


def copy_support_files(source: Path, target: Path, dtype: str | None = None) -> None:
    """Copy config, generation config and tokenizer files (everything but weights) from ``source``.

    ``dtype`` (e.g. 'bfloat16') is written into config.json's dtype key(s).
    """
    for item in sorted(Path(source).iterdir()):
        if not item.is_file() or item.name.endswith(WEIGHT_SUFFIXES) or item.name == INDEX_FILE:
            continue
        if item.name.lower().startswith("readme") or item.name.startswith("."):
            continue
        shutil.copy2(item, target / item.name)
    config_path = target / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        write_json_atomic(config_path, config)

