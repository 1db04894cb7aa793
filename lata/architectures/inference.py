"""An architecture found from a checkpoint itself: its config.json and its tensor names.

- **Block count**: the first of ``COUNT_KEYS`` that config.json, or else its ``text_config``
  (a multimodal model's language model), gives.
- **Blocks**: a tensor name's first all-digit component numbers its block: ``P.{l}.`` for the
  name up to it (``model.layers.{l}.``, ``transformer.h.{l}.``, ``blocks.{l}.``, ``layer.{l}.``,
  any other). A prefix is a candidate when the indices it holds are exactly 0..L-1 for the
  config's block count L. Several candidates (a vision tower as deep as the language model):
  the one beside the token embedding (its parent also holds ``embed_tokens.weight``, ``wte.weight``,
  ...), else the one holding the most tensors; a tie is refused. What sits deeper in a block
  (MoE experts and router, numbered or fused) belongs to it; every tensor outside the blocks
  (embeddings, final norm, lm_head, a vision tower, a projector) is the ``rest`` group.
- **Tied pair**: (output embedding, input embedding). The input embedding is found by name
  (``EMBEDDINGS``; beside the blocks first); the output embedding is the one tensor named as
  ``OUTPUTS`` are, else (a tied checkpoint stores it once) the alias transformers' class declares
  for that input embedding, else ``lm_head.weight`` beside the input embedding's model
  (``language_model.lm_head.weight`` for ``language_model.model.embed_tokens.weight``). No
  input embedding found by name: the pair the class declares, where its input embedding is a
  tensor of the checkpoint; else nothing is tied.
- **tie_word_embeddings default**: transformers' default for the model_type; for a type
  transformers does not know, tied when the checkpoint holds an input embedding and no output
  embedding.
- An encoder-decoder config (``is_encoder_decoder``) is refused: LATA merges decoder blocks.

Every refusal is one CheckpointError line naming the config file and what was looked for.
"""

from __future__ import annotations

import re
from collections import defaultdict

from lata.architectures import hints
from lata.architectures.data import Architecture, config_value

#: config keys of the block count, in the order they are read
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: the module names of an input (token) embedding
EMBEDDINGS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")
#: the module names of an output embedding
OUTPUTS = ("lm_head", "embed_out")
#: what a block prefix looks like, for messages
PATTERNS = "'P.{l}.' for l = 0..L-1 (model.layers.{l}., transformer.h.{l}., blocks.{l}., layer.{l}., ...)"
_INDEX = re.compile(r"0|[1-9][0-9]*")


def infer_architecture(config: dict, names: list[str], model_type: str, where: str,
                       given: dict | None = None) -> Architecture:
    """The architecture of a checkpoint from its config.json and tensor names; ``given``: the
    fields a ``<model_type>.json`` sets (they win, and what they set is not looked for)."""
    given = given or {}
    if config.get("is_encoder_decoder") is True:
        raise _refusal(where, model_type, "is an encoder-decoder (is_encoder_decoder: true); "
                                          "LATA merges decoder-only models")
    if "layer_prefixes" in given:
        prefixes = tuple(given["layer_prefixes"])
        key = given.get("num_layers_key") or next((k for k in COUNT_KEYS if config_value(config, k) is not None),
                                                  COUNT_KEYS[0])
    else:
        key, count = block_count(config, model_type, where, given.get("num_layers_key"))
        prefixes = (block_prefix(names, count, key, model_type, where),)
    if "tied_weights" in given:
        tied = tuple(given["tied_weights"].items())
    else:
        tied = tied_pair(names, prefixes, model_type)
    default = given.get("tie_word_embeddings_default")
    if default is None:
        default = hints.tie_default(model_type)
    if default is None:
        default = bool(tied) and tied[0][1] in names and tied[0][0] not in names
    return Architecture(model_type=model_type, layer_prefixes=prefixes, num_layers_key=key,
                        tied_weights=tied, tie_word_embeddings_default=bool(default))


def block_count(config: dict, model_type: str, where: str, key: str | None = None) -> tuple[str, int]:
    """(key, value) of the config's block count: ``key``, else the first of ``COUNT_KEYS`` set."""
    from lata.io.files import CheckpointError, shown

    keys = (key,) if key else COUNT_KEYS
    found = next((k for k in keys if config_value(config, k) is not None), None)
    if found is None:
        raise _refusal(where, model_type, f"its config gives no block count (looked for {', '.join(keys)}, "
                                          f"also under text_config)")
    value = config_value(config, found)
    named = found if config.get(found) is not None else f"text_config.{found}"
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{where}: {named} is {shown(value)}, not a non-negative integer")
    if value == 0:
        raise _refusal(where, model_type, f"its config says {named}=0: there are no blocks to merge")
    return found, value


def numbered(names: list[str]) -> dict[str, tuple[set[int], int]]:
    """{prefix 'P.{l}.': (the indices l it holds, how many tensors)}, by each name's first
    all-digit component (not the first component: a prefix is never empty)."""
    found: dict[str, list] = defaultdict(lambda: [set(), 0])
    for name in names:
        parts = name.split(".")
        index = next((i for i in range(1, len(parts) - 1) if _INDEX.fullmatch(parts[i])), None)
        if index is not None:
            entry = found[".".join(parts[:index]) + ".{l}."]
            entry[0].add(int(parts[index]))
            entry[1] += 1
    return {prefix: (indices, count) for prefix, (indices, count) in found.items()}


def block_prefix(names: list[str], count: int, key: str, model_type: str, where: str) -> str:
    """The prefix 'P.{l}.' whose indices are exactly 0..count-1 (see the module's rules)."""
    candidates = numbered(names)
    matching = sorted(p for p, (indices, _) in candidates.items() if indices == set(range(count)))
    if len(matching) == 1:
        return matching[0]
    if not matching:
        if not candidates:
            raise _refusal(where, model_type, f"no tensor name is numbered by block (looked for {PATTERNS}; "
                                              f"{key}={count})")
        held = sorted(candidates.items(), key=lambda item: -item[1][1])[:3]
        listing = "; ".join(f"'{p}' holds {_indices(indices)}" for p, (indices, _) in held)
        raise _refusal(where, model_type, f"{key}={count}, but no numbered tensors hold blocks 0..{count - 1} "
                                          f"(looked for {PATTERNS}): {listing}")
    beside = [p for p in matching if any(_beside(p, n) for n in _embeddings(names))]
    pool = beside or matching
    most = max(candidates[p][1] for p in pool)
    best = [p for p in pool if candidates[p][1] == most]
    if len(best) == 1:
        return best[0]
    listing = ", ".join(f"'{p}'" for p in best)
    raise _refusal(where, model_type, f"several prefixes hold blocks 0..{count - 1} ({key}={count}) with "
                                      f"{most} tensors each: {listing}; name the blocks in layer_prefixes")


def tied_pair(names: list[str], prefixes: tuple[str, ...], model_type: str) -> tuple[tuple[str, str], ...]:
    """((output embedding, input embedding),), or () where no input embedding is found."""
    rest = [n for n in names if not any(n.startswith(p.split("{l}")[0]) for p in prefixes)]
    inputs = _embeddings(rest)
    inputs = [n for n in inputs if any(_beside(p, n) for p in prefixes)] or inputs
    if len(inputs) != 1:
        present = set(names)
        return next(((pair,) for pair in hints.declared_ties(model_type) if pair[1] in present), ())
    embedding = inputs[0]
    outputs = [n for n in rest if n.split(".")[-2:] in ([o, "weight"] for o in OUTPUTS)]
    if len(outputs) == 1:
        return ((outputs[0], embedding),)
    declared = [alias for alias, canonical in hints.declared_ties(model_type) if canonical == embedding]
    if declared:
        return ((declared[0], embedding),)
    return ((".".join([*embedding.split(".")[:-3], "lm_head", "weight"]), embedding),)


def _embeddings(names) -> list[str]:
    return [n for n in names if n.split(".")[-2:] in ([e, "weight"] for e in EMBEDDINGS)]


def _beside(prefix: str, name: str) -> bool:
    """Whether tensor ``name`` is a module's weight in the model that holds the block list
    ``prefix`` ('model.embed_tokens.weight' is beside 'model.layers.{l}.')."""
    parent = prefix.split("{l}")[0].rstrip(".").rpartition(".")[0]
    rest = name[len(parent) + 1:] if parent else name
    return (not parent or name.startswith(parent + ".")) and rest.count(".") == 1


def _indices(indices: set[int]) -> str:
    ordered = sorted(indices)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}..{ordered[-1]}"
    shown = ", ".join(map(str, ordered[:6]))
    return shown + (", ..." if len(ordered) > 6 else "")


def _refusal(where: str, model_type: str, why: str):
    from lata.io.files import CheckpointError, shown

    plain = model_type.isprintable() and "/" not in model_type
    named = repr(model_type) if plain else shown(model_type)
    hint = f"; add lata/architectures/{model_type}.json" if plain else ""
    return CheckpointError(f"{where}: cannot find the blocks of model_type {named}: {why}{hint}")
