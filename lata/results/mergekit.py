"""mergekit recipes: LATA's layer weights written as a mergekit YAML (``export=mergekit``), and a
mergekit YAML's per-layer weights read back (``weighting=explicit weighting.from_mergekit=...``).

The recipe merges the same family with mergekit's method of the same steps
(``MergeMethod.mergekit``): ``base_model`` is LATA's anchor, each expert a model (a LoRA adapter
as mergekit's ``instruct+adapter``) whose ``weight`` is lambda_k * w_{l,k}, given as mergekit's
per-layer list (one value per block, which mergekit spreads over the blocks as a gradient:
block l gets entry l) after one entry per tensor outside the blocks (embeddings, final norm,
lm_head) with lambda_k * rest_weight, named by a filter on its exact name (mergekit would
otherwise give them a value from the list's end). The method's own parameters follow
(``MergeMethod.mergekit_parameters``), arithmetic in float32, output in the anchor's dtype.

What mergekit then computes, against LATA (docs/method.md, "mergekit recipes"): task
arithmetic the same bits where lambda is 1 (else within float32 rounding: mergekit scales once
by lambda * w, LATA by w then lambda); TIES keeps int(density * n) values where LATA keeps
ceil, elects + for a zero sign sum, and divides the agreeing experts' sum by the sum of their
weights where LATA divides by their count (the same where those weights are all 1); DARE and
DELLA draw their own random masks; DELLA ranks per row and rescales to the L1 norm.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import yaml

from lata.registry import ConfigError

log = logging.getLogger("lata")

#: the recipe's file in a run directory (``export=mergekit``)
RECIPE_FILE = "mergekit.yaml"
#: the largest recipe read (``weighting.from_mergekit``)
MAX_RECIPE_BYTES = 10_000_000
#: how deeply a weight's entries may nest ({value: {value: ...}})
_MAX_DEPTH = 8


def mergekit_recipe(plan) -> dict[str, Any]:
    """The mergekit recipe of a planned merge (a ``lata.plan.MergePlan``: its layer weights,
    lambdas and parameters)."""
    method, family = plan.method, plan.family
    check_exportable(method, has_target=family.target is not None)
    per_model = method.mergekit_parameters()
    outside = [n for n in family.tensor_names if family.layer_of(n) is None]
    anchor = family.anchor(plan.anchor)
    models = []
    for k in family.expert_names:
        lam = plan.lams[k]
        weight = [{"filter": n, "value": float(lam * plan.rest_weight)} for n in outside]
        weight.append({"value": [float(lam * w) for w in plan.weights[k]]})
        models.append({"model": _reference(family.experts[k]), "parameters": {"weight": weight, **per_model}})
    dtype = next((anchor.torch_dtype(n) for n in family.tensor_names if anchor.is_float(n)), None)
    recipe = {"merge_method": method.mergekit, "base_model": anchor.source, "models": models,
              "parameters": {"normalize": method.mergekit_normalize}, "dtype": "float32"}
    if dtype is not None:
        recipe["out_dtype"] = str(dtype).removeprefix("torch.")
    return recipe


def check_exportable(method, has_target: bool = False) -> None:
    """Refuse, naming the setting, a merge that no mergekit recipe can express."""
    if method.mergekit is None:
        raise ConfigError(f"export=mergekit: merge={method.name} has no mergekit counterpart")
    method.mergekit_parameters()  # refuses settings mergekit lacks
    if has_target:
        raise ConfigError("export=mergekit: mergekit adds the merged vectors to its base model, so a merge onto "
                          "model.target has no mergekit recipe")


def recipe_yaml(plan) -> str:
    header = (f"# mergekit recipe written by LATA: merge={plan.method.name}, weight = lambda_k * w_(l,k) per block\n"
              f"# (LATA's layer weights), the tensors outside the blocks by name. Run: mergekit-yaml THIS_FILE OUT\n")
    return header + yaml.safe_dump(mergekit_recipe(plan), sort_keys=False, width=120)


def _reference(ckpt) -> str:
    """How mergekit names an expert: its path or hub id; an adapter as ``instruct+adapter``."""
    instruct = getattr(ckpt, "instruct", None)
    return f"{instruct.source}+{ckpt.source}" if instruct is not None else ckpt.source


def mergekit_layer_weights(path: str | os.PathLike, num_layers: int, model: str | None = None) -> list[float]:
    """One model's ``weight`` in a mergekit recipe, one value per block as mergekit evaluates it
    (block l of L at t = l / (L - 1), a list being a gradient over t).

    ``model`` picks the model (its ``model`` entry, or the end of it); None: the only model with a
    weight. Entries with a filter apply, in mergekit, to the tensors they name: LATA has one
    weight per block and takes the entry without a filter (a warning names the others).

    The file must be a regular file of at most ``MAX_RECIPE_BYTES``, YAML, a mapping whose
    ``models`` is a list of mappings, each ``parameters`` a mapping, a weighted ``model`` a
    string, weights finite numbers; ConfigError naming the file (and the entry) otherwise.
    """
    recipe = _read_recipe(path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("models"), list):
        what = "uses slices" if isinstance(recipe, dict) and "slices" in recipe else "has no models list"
        raise ConfigError(f"weighting.from_mergekit={path}: the recipe {what}; LATA reads recipes with a "
                          f"'models' list")
    weighted = []
    for i, entry in enumerate(recipe["models"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"weighting.from_mergekit={path}: models[{i}] is {_shown(entry)}, not a mapping")
        parameters = entry.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ConfigError(f"weighting.from_mergekit={path}: models[{i}].parameters is {_shown(parameters)}, "
                              f"not a mapping")
        if (parameters or {}).get("weight") is not None:
            if not isinstance(entry.get("model"), str):
                raise ConfigError(f"weighting.from_mergekit={path}: models[{i}].model is {_shown(entry.get('model'))}, "
                                  f"not a model's path or hub id")
            weighted.append(entry)
    names = [m["model"] for m in weighted]
    if model is None:
        if len(weighted) != 1:
            raise ConfigError(f"weighting.from_mergekit={path}: {len(weighted)} models have a weight "
                              f"({', '.join(map(_shown, names))}); "
                              f"choose one with weighting.mergekit_model=...")
        chosen = weighted[0]
    else:
        matches = [m for m, n in zip(weighted, names) if n == model or n.endswith(model)]
        if len(matches) != 1:
            raise ConfigError(f"weighting.mergekit_model={model} names {len(matches)} of the weighted models of "
                              f"weighting.from_mergekit={path} ({', '.join(map(_shown, names))}); give one, or the end "
                              f"of its path")
        chosen = matches[0]
    setting = chosen["parameters"]["weight"]
    filters = _filters(setting, path)
    if filters:
        log.warning("weighting.from_mergekit=%s: the weight entries filtered by %s apply, in mergekit, to the tensors "
                    "they name; LATA takes one weight per block, from the entry without a filter", path,
                    ", ".join(repr(f) for f in filters))
    ts = [l / (num_layers - 1) for l in range(num_layers)] if num_layers > 1 else [1.0]
    return [_evaluate(setting, t, path) for t in ts]


def _read_recipe(path):
    """The parsed YAML of a recipe file; ConfigError naming it where it is not a regular file,
    is too large, or is not YAML."""
    from lata.io.checkpoints import CheckpointError, one_line, read_bounded

    try:
        text = read_bounded(Path(path), "weighting.from_mergekit: the recipe", MAX_RECIPE_BYTES)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return yaml.safe_load(text)
    except Exception as exc:  # YAMLError, and what a constructor raises (a bad date, too many digits...)
        raise ConfigError(f"weighting.from_mergekit={path}: cannot read it as a mergekit YAML: "
                          f"{one_line(exc)}") from None


def _shown(value) -> str:
    from lata.io.checkpoints import shown

    return shown(value)


def _filters(setting, path) -> list[str]:
    items = setting if isinstance(setting, list) else [setting]
    filters = [c["filter"] for c in items if isinstance(c, dict) and c.get("filter") not in (None, "*")]
    for f in filters:
        if not isinstance(f, str):
            raise ConfigError(f"weighting.from_mergekit={path}: filter {_shown(f)} is not a tensor name's part")
    return filters


def _number(value, path) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"weighting.from_mergekit={path}: weight {_shown(value)} is not a finite number")
    return number


def _evaluate(setting, t: float, path, depth: int = 0) -> float:
    """mergekit's ``evaluate_setting`` for a tensor no filter names: a number, a gradient, or
    the first entry without a filter."""
    if depth > _MAX_DEPTH:
        raise ConfigError(f"weighting.from_mergekit={path}: weight entries nest deeper than {_MAX_DEPTH} values")
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return _number(setting, path)
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            values = [_number(v, path) for v in setting]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return _number((1 - frac) * values[i0] + frac * values[i1], path)
        for cond in setting:
            if isinstance(cond, dict) and cond.get("filter") in (None, "*"):
                return _evaluate(cond.get("value"), t, path, depth + 1)
    raise ConfigError(f"weighting.from_mergekit={path}: weight {_shown(setting)} has no value for the blocks (a "
                      f"number, a list of numbers, or an entry without a filter)")
