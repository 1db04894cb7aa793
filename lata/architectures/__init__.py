"""Architectures: which tensors belong to which transformer block, and which are tied.

A checkpoint's architecture is found from the checkpoint itself (``lata.architectures.inference``):
any decoder whose blocks are numbered in its tensor names (``model.layers.{l}.``,
``transformer.h.{l}.``, ...) and whose config.json gives their count. A ``<model_type>.json``
beside this file is pure data, for the exceptions and overrides::

    layer_prefixes               name prefixes of block l, with "{l}" for the index
    num_layers_key               the config.json key holding the number of blocks
    tied_weights                 {alias: canonical} pairs that share storage when tied
    tie_word_embeddings_default  used when config.json does not say

A file setting all four is the architecture of its model_type (nothing is inferred); a file
setting some of them overrides those, and the rest is inferred.

Merge code never matches tensor names itself: it asks an :class:`Architecture`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lata.architectures.data import Architecture, config_value
from lata.architectures.inference import infer_architecture

__all__ = ["Architecture", "architecture_for", "architecture_of", "config_value", "infer_architecture",
           "known_model_types", "model_type_of"]

DATA_DIR = Path(__file__).parent
FIELDS = ("layer_prefixes", "num_layers_key", "tied_weights", "tie_word_embeddings_default")


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
    """The architecture a ``<model_type>.json`` sets whole (``model_type`` one of
    ``known_model_types``: a name is never made into a path outside this directory). ``where``:
    the config.json it comes from, named by the error (CheckpointError) for a type without a
    file, or whose file sets only some fields (those are found from a checkpoint:
    ``architecture_of``)."""
    from lata.io.files import CheckpointError, shown

    data = _data(model_type)
    if data is None:
        plain = isinstance(model_type, str) and model_type.isprintable() and "/" not in model_type
        hint = f" Add lata/architectures/{model_type}.json." if plain else ""
        raise CheckpointError(
            f"{where + ': ' if where else ''}no architecture data for model_type "
            f"{repr(model_type) if plain else shown(model_type)}; known: {', '.join(known_model_types())}.{hint}"
        )
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise CheckpointError(f"{where + ': ' if where else ''}lata/architectures/{model_type}.json sets only "
                              f"some fields (not {', '.join(missing)}): the rest is found from a checkpoint")
    return _from_data(model_type, data)


def architecture_of(config: dict, names: list[str], where: str | None = None) -> Architecture:
    """The architecture of a checkpoint from its config.json and tensor names: its
    ``<model_type>.json`` where that sets every field, else inferred (``infer_architecture``)
    with the fields such a file sets. CheckpointError naming ``where`` (the config file) where
    the blocks cannot be found."""
    where = where or "config.json"
    model_type = model_type_of(config, where)
    data = _data(model_type) or {}
    if all(f in data for f in FIELDS):
        return _from_data(model_type, data)
    return infer_architecture(config, names, model_type, where, given=data)


def _data(model_type: str) -> dict | None:
    """The fields ``<model_type>.json`` sets, or None where there is no such file."""
    if model_type not in known_model_types():
        return None
    data = json.loads((DATA_DIR / f"{model_type}.json").read_text())
    unknown = sorted(set(data) - {"model_type", *FIELDS})
    if unknown:
        raise ValueError(f"lata/architectures/{model_type}.json: unknown fields {', '.join(unknown)} "
                         f"(known: {', '.join(FIELDS)})")
    return {k: v for k, v in data.items() if k in FIELDS}


def _from_data(model_type: str, data: dict) -> Architecture:
    return Architecture(
        model_type=model_type,
        layer_prefixes=tuple(data["layer_prefixes"]),
        num_layers_key=data["num_layers_key"],
        tied_weights=tuple(data["tied_weights"].items()),
        tie_word_embeddings_default=bool(data["tie_word_embeddings_default"]),
    )
