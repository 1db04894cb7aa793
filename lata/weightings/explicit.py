"""Explicit: the user's own weight per layer, e.g. ``weighting.weights=[0,0,0.5,1]``, or one
model's per-layer weights in a mergekit recipe (``weighting.from_mergekit=PATH``,
``weighting.mergekit_model=...`` where several models have one).

The recipe is read where the weighting is validated (``lata.config.validate_weighting`` hands
its bytes to ``given``), never in ``weights_for``; the weighting holds the chosen model's ``weight`` setting and evaluates it as
mergekit does, one value per block (block l of L at t = l / (L - 1), a list being a gradient
over t). Entries with a filter apply, in mergekit, to the tensors they name: LATA has one weight
per block and takes the entry without a filter (a warning names the others).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import yaml

from lata.io.files import one_line, shown as _shown
from lata.registry import ConfigError
from lata.weightings import Weighting, weighting

log = logging.getLogger("lata")

#: how deeply a weight's entries may nest ({value: {value: ...}})
_MAX_DEPTH = 8
KEY = "weighting.from_mergekit"


@weighting("explicit")
@dataclass(frozen=True)
class Explicit(Weighting):
    weights: Optional[List[float]] = None
    from_mergekit: Optional[str] = None
    mergekit_model: Optional[str] = None
    #: the chosen model's ``weight`` setting, from the recipe's bytes (``given``)
    setting: Any = field(default=None, repr=False, metadata={"given": True})

    def check(self):
        if self.from_mergekit is not None:
            if self.weights:
                raise ConfigError("weighting=explicit takes weighting.weights or weighting.from_mergekit, not both")
            return
        if self.mergekit_model is not None:
            raise ConfigError("weighting.mergekit_model picks a model of weighting.from_mergekit, which is not set")
        if not self.weights:
            raise ConfigError("weighting=explicit needs weighting.weights: a list of one number per layer "
                              "(or weighting.from_mergekit=PATH, a mergekit recipe)")

    def inputs(self):
        return {KEY: self.from_mergekit} if self.from_mergekit is not None else {}

    def given(self, contents):
        return dataclasses.replace(self, setting=chosen_weight(contents[KEY], self.from_mergekit, self.mergekit_model))

    def weights_for(self, similarities):
        L = len(similarities)
        if self.from_mergekit is not None:
            if self.setting is None:
                raise ValueError(f"{KEY}={self.from_mergekit} was not read: build the weighting with "
                                 "lata.config.validate_weighting")
            ts = [l / (L - 1) for l in range(L)] if L > 1 else [1.0]
            return [_evaluate(self.setting, t, self.from_mergekit) for t in ts]
        if len(self.weights) != L:
            raise ValueError(f"weighting.weights must list one weight per layer: expected {L}, got {len(self.weights)}")
        return [float(x) for x in self.weights]


def chosen_weight(text: bytes, path: str, model: str | None = None) -> Any:
    """One model's ``weight`` setting in a mergekit recipe's bytes: ``model`` picks the model
    (its ``model`` entry, or the end of it); None: the only model with a weight.

    The recipe must be YAML, a mapping whose ``models`` is a list of mappings, each ``parameters``
    a mapping, a weighted ``model`` a string, weights finite numbers; ConfigError naming the file
    (and the entry) otherwise.
    """
    recipe = _parsed(text, path)
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
    _evaluate(setting, 0.0, path)  # a setting with no value for the blocks is refused here, at validation
    return setting


def _parsed(text: bytes, path: str) -> Any:
    try:
        return yaml.safe_load(text)
    except Exception as exc:  # YAMLError, and what a constructor raises (a bad date, too many digits...)
        raise ConfigError(f"{KEY}={path}: cannot read it as a mergekit YAML: {one_line(exc)}") from None


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
