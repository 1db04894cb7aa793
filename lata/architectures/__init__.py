"""Architecture data: which tensors belong to which transformer block, and which are tied.

Each ``<model_type>.json`` beside this file is pure data::

    layer_prefixes               name prefixes of block l, with "{l}" for the index
    num_layers_key               the config.json key holding the number of blocks
    tied_weights                 {alias: canonical} pairs that share storage when tied
    tie_word_embeddings_default  used when config.json does not say

Merge code never matches tensor names itself: it asks an :class:`Architecture`.
Adding a model family means adding a JSON file, nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DATA_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layer_prefixes: tuple[str, ...]
    num_layers_key: str
    tied_weights: tuple[tuple[str, str], ...]
    tie_word_embeddings_default: bool

    @cached_property
    def _layer_regex(self) -> re.Pattern:
        alternatives = [re.escape(p).replace(r"\{l\}", r"(\d+)") for p in self.layer_prefixes]
        return re.compile("^(?:" + "|".join(alternatives) + ")")

    def layer_of(self, tensor_name: str) -> int | None:
        """Block index of a tensor, or None for the ``rest`` group."""
        match = self._layer_regex.match(tensor_name)
        if match is None:
            return None
        return int(next(g for g in match.groups() if g is not None))

    def tied_aliases(self, config: dict) -> dict[str, str]:
        """{alias: canonical} for the weights tied in this checkpoint's config."""
        tied = config.get("tie_word_embeddings", self.tie_word_embeddings_default)
        return dict(self.tied_weights) if tied else {}

    def num_layers(self, config: dict) -> int | None:
        return config_value(config, self.num_layers_key)

    def check_config(self, config: dict, where: str) -> None:
        """Refuse a config.json value of the wrong type among those LATA reads: the layer count
        (``num_layers_key``) and ``vocab_size`` (non-negative integers; in config.json, else in its
        ``text_config``; a key given as null is refused, a missing one is not checked) and
        ``tie_word_embeddings`` (true or false). CheckpointError naming ``where`` (the file) and
        the key."""
        from lata.io.files import CheckpointError, shown

        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        for key in (self.num_layers_key, "vocab_size"):
            if config.get(key) is not None:
                value, named = config[key], key
            elif text.get(key) is not None:
                value, named = text[key], f"text_config.{key}"
            elif key in config or key in text:
                value, named = None, key if key in config else f"text_config.{key}"
            else:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{where}: {named} is {shown(value)}, not a non-negative integer")
        tied = config.get("tie_word_embeddings", self.tie_word_embeddings_default)
        if not isinstance(tied, bool):
            raise CheckpointError(f"{where}: tie_word_embeddings is {shown(tied)}, not true or false")


def config_value(config: dict, key: str):
    """``config[key]``, or the same key of its ``text_config`` (multimodal configs), or None."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    return value


def model_type_of(config: dict, where: str) -> str:
    """config.json's ``model_type``; CheckpointError naming ``where`` (the file) when it has none
    or it is not a string."""
    from lata.io.files import CheckpointError, shown

    model_type = config.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{where} has no model_type: LATA needs it to know the model's architecture "
                              f"(known: {', '.join(known_model_types())})")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{where}: model_type is {shown(model_type)}, not a string")
    return model_type


def known_model_types() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def architecture_for(model_type: str, where: str | None = None) -> Architecture:
    """Load the architecture data for a config.json ``model_type`` (one of ``known_model_types``:
    a name is never made into a path outside this directory). ``where``: the config.json it
    comes from, named by the error (CheckpointError) for a type without data."""
    path = DATA_DIR / f"{model_type}.json"
    if model_type not in known_model_types():
        from lata.io.files import CheckpointError, shown

        plain = isinstance(model_type, str) and model_type.isprintable() and "/" not in model_type
        hint = f" Add lata/architectures/{model_type}.json." if plain else ""
        raise CheckpointError(
            f"{where + ': ' if where else ''}no architecture data for model_type "
            f"{repr(model_type) if plain else shown(model_type)}; known: {', '.join(known_model_types())}.{hint}"
        )
    data = json.loads(path.read_text())
    return Architecture(
        model_type=data["model_type"],
        layer_prefixes=tuple(data["layer_prefixes"]),
        num_layers_key=data["num_layers_key"],
        tied_weights=tuple(data["tied_weights"].items()),
        tie_word_embeddings_default=bool(data["tie_word_embeddings_default"]),
    )


def architecture_of(config: dict, names: list[str], where: str | None = None) -> Architecture:
    """The architecture of a checkpoint from its config.json and tensor names."""
    return architecture_for(model_type_of(config, where or "config.json"), where=where)
