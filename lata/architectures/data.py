"""The architecture record: which tensors belong to which transformer block, and which are tied.

An :class:`Architecture` is plain data (prefixes, a config key, tied pairs, a default); merge code
never matches tensor names itself, it asks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Architecture:
    model_type: str
    #: name prefixes of block l, with "{l}" for the index
    layer_prefixes: tuple[str, ...]
    #: the config.json key holding the number of blocks (read in its text_config too)
    num_layers_key: str
    #: (alias, canonical) pairs that share storage when the config ties word embeddings
    tied_weights: tuple[tuple[str, str], ...]
    #: used when config.json (and its text_config) does not say
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

    def ties(self, config: dict) -> bool:
        """Whether this checkpoint's config ties its word embeddings: ``tie_word_embeddings`` of
        config.json, else of its ``text_config``, else ``tie_word_embeddings_default``."""
        tied = config.get("tie_word_embeddings")
        if tied is None and isinstance(config.get("text_config"), dict):
            tied = config["text_config"].get("tie_word_embeddings")
        return self.tie_word_embeddings_default if tied is None else tied

    def tied_aliases(self, config: dict) -> dict[str, str]:
        """{alias: canonical} for the weights tied in this checkpoint's config."""
        return dict(self.tied_weights) if self.ties(config) else {}

    def num_layers(self, config: dict) -> int | None:
        return config_value(config, self.num_layers_key)

    def check_config(self, config: dict, where: str) -> None:
        """Refuse a config.json value of the wrong type among those LATA reads: the layer count
        (``num_layers_key``) and ``vocab_size`` (non-negative integers; in config.json, else in its
        ``text_config``; a key given as null is refused, a missing one is not checked) and
        ``tie_word_embeddings`` (true or false, read as ``ties`` reads it). CheckpointError naming
        ``where`` (the file) and the key."""
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
        if "tie_word_embeddings" in config or "tie_word_embeddings" not in text:
            tied, named = config.get("tie_word_embeddings", self.tie_word_embeddings_default), "tie_word_embeddings"
        else:
            tied, named = text["tie_word_embeddings"], "text_config.tie_word_embeddings"
        if not isinstance(tied, bool):
            raise CheckpointError(f"{where}: {named} is {shown(tied)}, not true or false")


def config_value(config: dict, key: str):
    """``config[key]``, or the same key of its ``text_config`` (multimodal configs), or None."""
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    return value
