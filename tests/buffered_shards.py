"""The buffered shard writer ``lata.io.shards.StreamingShardWriter`` is tested against
(tests/test_scale.py): the simplest way to cut tensors into the same size-bounded shards."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from lata.io.atomic import write_json_atomic
from lata.io.files import CheckpointError
from lata.io.tensorfiles import INDEX_FILE, SINGLE_FILE


class ShardedWriter:
    """Writes tensors into size-bounded safetensors shards inside a (temporary) directory.

    Tensors are buffered until a shard reaches ``max_shard_bytes`` and then written, so memory
    holds at most one shard. ``finish`` names the shards as Hugging Face does and writes the
    index; the caller renames the directory into place (see ``lata.io.atomic``).
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
