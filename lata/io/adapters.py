"""LoRA adapters (PEFT) as experts: a checkpoint whose tensors are the instruct model's plus the
adapter's deltas, computed one tensor at a time.

``model.experts.<name>`` may name a PEFT adapter directory (``adapter_config.json`` and
``adapter_model.safetensors``; local or a hub id). For each module the adapter targets, the
expert's weight is theta_inst + Delta W with

    Delta W = scaling * B @ A               (transposed where ``fan_in_fan_out``; embeddings:
                                             (B @ A)^T from ``lora_embedding_A/B``)
    scaling = lora_alpha / r                (rsLoRA, ``use_rslora``: lora_alpha / sqrt(r))

r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern`` where they name it (PEFT's
pattern rule: the pattern matches the end of the module's name). Every other tensor is the
instruct model's, so the expert's task vector is Delta W on the targeted modules and zero
elsewhere, and its complex vector is that plus the instruction vector (docs/method.md). Tensors the
adapter saves whole (``modules_to_save``, or an embedding's ``base_layer`` saved with it) replace
the instruct model's, as PEFT loads them.

Decisions:
- Delta W is computed in float32 and added to the instruct tensor in float32; the sum is stored
  in the instruct tensor's dtype, as a full checkpoint of the merged adapter would hold it. No
  expert checkpoint is ever written or held: each tensor is made when it is read.
- Refused by name before any work: adapter types other than LoRA (IA3, LoHa, LoKr, prompt
  tuning...), DoRA, LoRA biases, layer replication, LoRA on parameters or convolutions, and a
  module the model does not have. A shape that disagrees with the model's is an error; an
  adapter trained on another base (``base_model_name_or_path``) is a warning.
- ``adapter_config.json`` must be a JSON object with the types PEFT's ``LoraConfig`` expects of
  the keys LATA reads (``peft_type`` a string; ``r`` and ``rank_pattern``'s values positive
  integers, PEFT's default r 8; ``lora_alpha`` and ``alpha_pattern``'s values finite numbers;
  the patterns objects whose keys are regular expressions; ``use_rslora``, ``fan_in_fan_out``,
  ``use_dora``, ``lora_bias`` true or false; ``base_model_name_or_path`` a string), and the
  weights file a valid safetensors file (``lata.io.tensorfiles.read_header``).
- A module whose factors' rank is not the r the config gives it (``rank_pattern``, else ``r``)
  is refused: PEFT builds each module with that r and refuses to load factors of another
  (a size mismatch), so no PEFT model is this adapter.
- The adapter's deltas are computed with plain torch, not by loading the model into PEFT:
  PEFT needs the whole model in memory, and the formula is PEFT's own (``get_delta_weight``);
  tests/test_adapters.py compares the result with PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch

from lata.io.checkpoints import Checkpoint, resolve
from lata.io.files import CheckpointError, json_kind, one_line, read_json, shown
from lata.io.tensorfiles import read_header, read_tensor

log = logging.getLogger("lata")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
#: adapter_config.json keys that change what the adapter computes and that LATA does not follow
_REFUSED_FLAGS = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "layer_replication": "layer replication",
                  "target_parameters": "LoRA on parameters (target_parameters)"}
#: adapter_config.json keys that hold true or false (or null, PEFT's default false)
_FLAGS = ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias")
#: PEFT's LoraConfig defaults of r and lora_alpha
_DEFAULT_R, _DEFAULT_ALPHA = 8, 8


def is_adapter(path: Path) -> bool:
    """Whether a directory holds ``adapter_config.json`` (of whatever kind: one that is not a
    regular file is then refused by name)."""
    return os.path.lexists(Path(path) / CONFIG_FILE)


def open_checkpoint(path_or_id, role: str, instruct: Checkpoint) -> Checkpoint:
    """A model directory as a ``Checkpoint``, or a PEFT adapter over ``instruct`` as an
    ``AdapterCheckpoint``."""
    path = resolve(path_or_id)
    if is_adapter(path):
        return AdapterCheckpoint(path_or_id, instruct, role=role, path=path)
    return Checkpoint(path_or_id, role=role)


class _Lora:
    """One module's low-rank factors: Delta W = scaling * B @ A (transposed if ``transpose``)."""

    def __init__(self, a: str, b: str, scaling: float, transpose: bool):
        self.a, self.b, self.scaling, self.transpose = a, b, scaling, transpose


class AdapterCheckpoint(Checkpoint):
    """The expert a LoRA adapter makes of ``instruct``: the same names, shapes and dtypes, each
    targeted tensor computed as instruct + Delta W when read (``get``, ``read_later``)."""

    def __init__(self, path_or_id, instruct: Checkpoint, role: str = "model", path: Path | None = None):
        # deliberately not Checkpoint.__init__: the tensors are the instruct model's
        self.role = role
        self.source = str(path_or_id)
        self.path = path if path is not None else resolve(path_or_id)
        self.instruct = instruct
        self.config = instruct.config
        self.config_file = instruct.config_file
        self.files = instruct.files
        self.adapter_config = self._read_adapter_config()
        self._file = self.path / WEIGHTS_FILE
        if not os.path.lexists(self._file):
            raise CheckpointError(f"adapter {self.path} ({role}) has {CONFIG_FILE} but no {WEIGHTS_FILE} "
                                  f"(save it with safetensors)")
        self._entries = read_header(self._file)
        self.loras, self.replaced = self._plan()
        self._check_base()

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.role}: {self.path} over {self.instruct.path})"

    # ------------------------------------------------------------------ what the adapter holds

    def _read_adapter_config(self) -> dict:
        file = self.path / CONFIG_FILE
        config = read_json(file, f"adapter config ({self.role})")
        if not isinstance(config, dict):
            raise CheckpointError(f"{file} ({self.role}) is {json_kind(config)}, not a JSON object")
        peft_type = config.get("peft_type")
        if peft_type is not None and not isinstance(peft_type, str):
            raise CheckpointError(f"{file} ({self.role}): peft_type is {shown(peft_type)}, not a string")
        kind = (peft_type or "").upper()
        if kind != "LORA":
            kind = kind if kind.isprintable() else shown(kind)
            raise CheckpointError(f"adapter {self.path} ({self.role}) is a {kind or 'untyped'} adapter "
                                  f"(peft_type in {file.name}); LATA merges LoRA adapters only")
        _check_lora_config(config, f"{file} ({self.role})")
        for key, what in _REFUSED_FLAGS.items():
            if config.get(key):
                raise CheckpointError(f"adapter {self.path} ({self.role}) uses {what} ({key} in {file.name}); "
                                      f"LATA merges plain LoRA adapters only: merge it into a full checkpoint "
                                      f"first (PEFT's merge_and_unload)")
        return config

    def _plan(self) -> tuple[dict[str, _Lora], dict[str, str]]:
        """{tensor: its LoRA factors}, {tensor: the adapter key that replaces it whole}."""
        keys = list(self._entries)
        modules: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        model = set(self.instruct.names)
        for key in keys:
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", name)
            if match:
                modules.setdefault(match.group(1), {})[match.group(2)] = key
            elif name.endswith(".base_layer.weight"):
                replaced[_model_tensor(name.removesuffix(".base_layer.weight") + ".weight", model)] = key
            else:  # a module saved whole (modules_to_save)
                tensor = _model_tensor(name.replace(".modules_to_save.default.", "."), model)
                if tensor not in model:
                    raise CheckpointError(f"adapter {self._file} ({self.role}) holds '{key}', which is neither a "
                                          f"LoRA factor nor a tensor of the model")
                replaced[tensor] = key
        loras = {}
        for module, parts in modules.items():
            tensor = _model_tensor(f"{module}.weight", model)
            if tensor not in model:
                raise CheckpointError(f"adapter {self._file} ({self.role}) targets module '{module}', which the model "
                                      f"({self.instruct.path}) does not have (no tensor '{tensor}')")
            embedding = "lora_embedding_A" in parts
            a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else \
                (parts.get("lora_A.weight"), parts.get("lora_B.weight"))
            if a is None or b is None:
                raise CheckpointError(f"adapter {self._file} ({self.role}) has only one of the two LoRA factors of "
                                      f"module '{module}'")
            lora = _Lora(a, b, 0.0, transpose=embedding or bool(self.adapter_config.get("fan_in_fan_out")))
            self._check_shapes(tensor, lora, embedding)
            lora.scaling = self._scaling(module, self._rank(module, lora))
            loras[tensor] = lora
        for tensor, key in replaced.items():
            if tensor not in model:
                raise CheckpointError(f"adapter {self._file} ({self.role}) saves '{key}', but the model has no "
                                      f"tensor '{tensor}'")
            if self._shape(key) != tuple(self.instruct.shape(tensor)):
                raise CheckpointError(f"adapter {self._file} ({self.role}) saves '{tensor}' with shape "
                                      f"{list(self._shape(key))}, the model's is {list(self.instruct.shape(tensor))} "
                                      f"(a resized vocabulary?)")
        return loras, replaced

    def _shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def _tensor(self, key: str) -> torch.Tensor:
        return read_tensor(self._file, key, self._entries[key])

    def _rank(self, module: str, lora: _Lora) -> int:
        """The factors' rank, which must be the r the config gives the module, as PEFT requires."""
        rank = self._shape(lora.a)[0]
        config = self.adapter_config
        r = _by_pattern(config.get("rank_pattern") or {}, module, config.get("r", _DEFAULT_R))
        if rank != r:
            raise CheckpointError(f"adapter {self._file} ({self.role}), module '{module}': its LoRA factors have rank "
                                  f"{rank}, but {CONFIG_FILE} gives it r={r} (r, or rank_pattern): PEFT would refuse "
                                  f"to load this adapter (a size mismatch)")
        return rank

    def _scaling(self, module: str, r: int) -> float:
        """lora_alpha / r (rsLoRA: / sqrt(r)), alpha from ``alpha_pattern`` where it names the module."""
        config = self.adapter_config
        alpha = _by_pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", _DEFAULT_ALPHA))
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    def _check_shapes(self, tensor: str, lora: _Lora, embedding: bool) -> None:
        a, b = self._shape(lora.a), self._shape(lora.b)
        where = f"adapter {self._file} ({self.role}), module '{tensor.removesuffix('.weight')}'"
        if len(a) != 2 or len(b) != 2:
            raise CheckpointError(f"{where}: LoRA factors of shapes {list(a)} and {list(b)} (a convolution?); "
                                  f"LATA merges LoRA on linear and embedding layers only")
        if a[0] != b[1]:
            raise CheckpointError(f"{where}: lora_A has rank {a[0]} but lora_B {b[1]}")
        made = (b[0], a[1])
        made = made[::-1] if lora.transpose else made
        if tuple(made) != tuple(self.instruct.shape(tensor)):
            raise CheckpointError(f"{where}: B @ A has shape {list(made)}, but the model's '{tensor}' is "
                                  f"{list(self.instruct.shape(tensor))}: the adapter is for another model")

    def _check_base(self) -> None:
        trained_on = self.adapter_config.get("base_model_name_or_path")
        if trained_on and not _same_model(trained_on, self.instruct):
            log.warning("%s: adapter %s was trained on '%s', but the instruct model is %s; its deltas are added "
                        "to the instruct model", self.role, self.path, trained_on, self.instruct.source)

    # ------------------------------------------------------------------ the tensors

    def delta(self, name: str) -> torch.Tensor | None:
        """Delta W of one tensor in float32 (None where the adapter does not target it)."""
        lora = self.loras.get(name)
        if lora is None:
            return None
        a = self._tensor(lora.a).float()
        b = self._tensor(lora.b).float()
        delta = (b @ a).mul_(lora.scaling)
        return delta.T if lora.transpose else delta

    def get(self, name: str) -> torch.Tensor:
        if name not in self.loras and name not in self.replaced:
            return self.instruct.get(name)
        try:
            return self._made(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot make tensor '{name}' of adapter {self.path} ({self.role}): {exc}") from exc

    def _made(self, name: str) -> torch.Tensor:
        dtype = self.instruct.torch_dtype(name) or self.instruct.get(name).dtype
        stored = self._tensor(self.replaced[name]) if name in self.replaced else self.instruct.get(name)
        delta = self.delta(name)
        if delta is None:
            return stored.to(dtype)
        return (stored.float() + delta).to(dtype)

    def read_later(self, name: str, pin: bool = False) -> tuple[torch.Tensor, list]:
        if name not in self.loras and name not in self.replaced:
            return self.instruct.read_later(name, pin)
        dtype = self.instruct.torch_dtype(name) or self.instruct.get(name).dtype
        out = torch.empty(self.instruct.shape(name), dtype=dtype, pin_memory=pin)
        return out, [lambda: out.copy_(self.get(name))]

    def prefetch(self, names) -> None:
        self.instruct.prefetch(names)

    def cached(self, names, samples: int | None = None) -> bool:
        return self.instruct.cached(names, samples)

    def release(self, names) -> None:
        self.instruct.release(names)

    def refuse_non_finite(self, name: str, tensor: torch.Tensor | None = None) -> None:
        tensor = self.get(name) if tensor is None else tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"tensor '{name}' of adapter {self._file} ({self.role}) over the instruct model "
                                  f"contains NaN or Inf values")

    @property
    def names(self) -> list[str]:
        return self.instruct.names

    def shape(self, name: str) -> tuple[int, ...]:
        return self.instruct.shape(name)

    def dtype_name(self, name: str) -> str:
        return self.instruct.dtype_name(name)

    def close(self) -> None:
        pass  # no file is held open: each factor is read when needed


def _model_tensor(name: str, model: set[str]) -> str:
    """The checkpoint's name for a module's tensor: as PEFT names it, or without its first
    component where the checkpoint leaves out the model's prefix (GPT-2's ``transformer.``)."""
    if name in model or "." not in name:
        return name
    shorter = name.split(".", 1)[1]
    return shorter if shorter in model else name


def _check_lora_config(config: dict, where: str) -> None:
    """The types PEFT's LoraConfig expects of the keys LATA reads; CheckpointError naming the file
    (``where``) and the key otherwise."""
    def refuse(key: str, value, wanted: str):
        raise CheckpointError(f"{where}: {key} is {shown(value)}, not {wanted}")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def finite(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key in _FLAGS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            refuse(key, config[key], "true or false")
    if "r" in config and not positive_int(config["r"]):
        refuse("r", config["r"], "a positive integer (LoRA's rank; PEFT refuses it too)")
    if "lora_alpha" in config and not finite(config["lora_alpha"]):
        refuse("lora_alpha", config["lora_alpha"], "a finite number")
    for key, valid, wanted in (("rank_pattern", positive_int, "a positive integer"),
                               ("alpha_pattern", finite, "a finite number")):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            refuse(key, patterns, "an object of module patterns")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise CheckpointError(f"{where}: {key} key {shown(pattern)} is not a regular expression "
                                      f"({one_line(exc)})") from None
            if not valid(value):
                refuse(f"{key}[{shown(pattern)}]", value, wanted)
    trained_on = config.get("base_model_name_or_path")
    if trained_on is not None and not isinstance(trained_on, str):
        refuse("base_model_name_or_path", trained_on, "a string")


def _by_pattern(patterns: dict, module: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: a key applies to a module whose name
    ends with it (after a dot), the first such key in order."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _same_model(trained_on: str, instruct: Checkpoint) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the instruct model (the same hub
    id, the same directory, or the same last path part)."""
    if trained_on == instruct.source:
        return True
    try:
        if Path(trained_on).expanduser().resolve() == Path(instruct.path).resolve():
            return True
    except OSError:
        pass
    return Path(trained_on.rstrip("/")).name == Path(str(instruct.source).rstrip("/")).name
