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


def config_value(config: dict, key: str):
    """``config[key]``, or the same key of its ``text_config`` (multimodal configs), or None."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    return value


def known_model_types() -> list[str]:
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def architecture_for(model_type: str) -> Architecture:
    """Load the architecture data for a config.json ``model_type``."""
    path = DATA_DIR / f"{model_type}.json"
    if not path.is_file():
        raise ValueError(
            f"no architecture data for model_type '{model_type}'; known: "
            f"{', '.join(known_model_types())}. Add lata/architectures/{model_type}.json."
        )
    data = json.loads(path.read_text())
    return Architecture(
        model_type=data["model_type"],
        layer_prefixes=tuple(data["layer_prefixes"]),
        num_layers_key=data["num_layers_key"],
        tied_weights=tuple(data["tied_weights"].items()),
        tie_word_embeddings_default=bool(data["tie_word_embeddings_default"]),
    )
