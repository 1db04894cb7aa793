"""mergekit recipes: LATA's layer weights written as a mergekit YAML (``export=mergekit``). A
recipe's per-layer weights are read back by ``weighting=explicit weighting.from_mergekit=...``
(``lata.weightings.explicit``).

The recipe merges the same family with mergekit's method of the same steps
(``MergeMethod.mergekit``): ``base_model`` is LATA's anchor, each expert a model (a LoRA adapter
as mergekit's ``instruct+adapter``) whose ``weight`` is lambda_k * w_{l,k}, given as mergekit's
per-layer list (one value per block, which mergekit spreads over the blocks as a gradient:
block l gets entry l) after one entry per tensor outside the blocks (embeddings, final norm,
lm_head) with lambda_k * rest_weight, named by a filter on its exact name (mergekit would
otherwise give them a value from the list's end). The method's own parameters follow, per model
(``MergeMethod.mergekit_parameters``) and shared (``mergekit_shared``); arithmetic in float32,
output in the anchor's dtype. Where the weights are not a per-model weight in mergekit
(``MergeMethod.mergekit_weights``): SLERP's per-block t takes the same per-layer form, with the
first expert as mergekit's base model; a method that takes no weights (SCE, Model Stock) is
exported only where every lambda_k * w_{l,k} is 1, and Model Soup (mergekit's normalized
``linear``, no base model, each weight lambda_k) only where every layer weight is 1.

What mergekit then computes, against LATA: docs/method.md, "mergekit recipes".
"""

from __future__ import annotations

from typing import Any

import yaml

from lata.registry import ConfigError

#: the recipe's file in a run directory (``export=mergekit``)
RECIPE_FILE = "mergekit.yaml"


def mergekit_recipe(plan) -> dict[str, Any]:
    """The mergekit recipe of a planned merge (a ``lata.plan.MergePlan``: its layer weights,
    lambdas and parameters)."""
    method, family = plan.method, plan.family
    method.check_exportable(has_target=family.target is not None)
    per_model = method.mergekit_parameters()
    outside = [n for n in family.tensor_names if family.layer_of(n) is None]
    anchor = family.anchor(plan.anchor)
    scales = {k: ([plan.lams[k] * plan.rest_weight] * len(outside), [plan.lams[k] * w for w in plan.weights[k]])
              for k in family.expert_names}
    if not method.scales_vectors:  # the weights only set t: mergekit cannot keep the anchor's block
        dropped = [i for i, each in enumerate(zip(*(rest + blocks for rest, blocks in scales.values())))
                   if not any(each)]
        if dropped:
            where = outside[dropped[0]] if dropped[0] < len(outside) else f"block {dropped[0] - len(outside)}"
            raise ConfigError(f"export=mergekit: where every expert's lambda_k * w_(l,k) is 0 ({where}) LATA keeps the "
                              f"anchor's weights, which mergekit's {method.mergekit} cannot express (it interpolates at "
                              f"t = 0.5 there); choose a weighting that gives every block some weight")
    models, shared, base = [], method.mergekit_shared(), anchor.source
    if method.mergekit_weights == "t":  # two experts: their per-block t, the first as mergekit's base model
        first, second = (scales[k] for k in family.expert_names)
        rest = [method.mergekit_t(a1, a2) for a1, a2 in zip(first[0], second[0])]
        blocks = [method.mergekit_t(a1, a2) for a1, a2 in zip(first[1], second[1])]
        shared["t"] = _per_block(outside, rest, blocks)
        base = _reference(family.experts[family.expert_names[0]])
    elif method.mergekit_weights == "none":
        uneven = [k for k, (rest, blocks) in scales.items() if any(a != 1.0 for a in rest + blocks)]
        if uneven:
            raise ConfigError(f"export=mergekit: mergekit's {method.mergekit} takes no per-model weights, so only a merge "
                              f"whose every lambda_k * w_(l,k) is 1 has a recipe; expert '{uneven[0]}' has others "
                              f"(use weighting=uniform and lambda 1)")
    elif method.mergekit_weights == "lambda":
        uneven = [k for k in family.expert_names if plan.rest_weight != 1.0 or any(w != 1.0 for w in plan.weights[k])]
        if uneven:
            raise ConfigError(f"export=mergekit: mergekit's {method.mergekit} divides by the per-block weights' sum, the "
                              f"same merge only where every layer weight is 1; expert '{uneven[0]}' has others "
                              f"(use weighting=uniform)")
        base = None
    for k in family.expert_names:
        parameters = dict(per_model)
        if method.mergekit_weights == "weight":
            parameters = {"weight": _per_block(outside, *scales[k]), **per_model}
        elif method.mergekit_weights == "lambda":
            parameters = {"weight": float(plan.lams[k]), **per_model}
        models.append({"model": _reference(family.experts[k]), **({"parameters": parameters} if parameters else {})})
    dtype = next((anchor.torch_dtype(n) for n in family.tensor_names if anchor.is_float(n)), None)
    recipe = {"merge_method": method.mergekit, **({"base_model": base} if base is not None else {}), "models": models,
              "parameters": shared, "dtype": "float32"}
    if dtype is not None:
        recipe["out_dtype"] = str(dtype).removeprefix("torch.")
    return recipe


def _per_block(outside: list[str], rest: list[float], blocks: list[float]) -> list[dict[str, Any]]:
    """A mergekit setting: one filter per tensor outside the blocks, then the per-block list."""
    setting = [{"filter": n, "value": float(v)} for n, v in zip(outside, rest)]
    return setting + [{"value": [float(v) for v in blocks]}]


def recipe_yaml(plan) -> str:
    header = (f"# mergekit recipe written by LATA: merge={plan.method.name}, weight = lambda_k * w_(l,k) per block\n"
              f"# (LATA's layer weights), the tensors outside the blocks by name. Run: mergekit-yaml THIS_FILE OUT\n")
    return header + yaml.safe_dump(mergekit_recipe(plan), sort_keys=False, width=120)


def _reference(ckpt) -> str:
    """How mergekit names an expert: its path or hub id; an adapter as ``instruct+adapter``."""
    instruct = getattr(ckpt, "instruct", None)
    return f"{instruct.source}+{ckpt.source}" if instruct is not None else ckpt.source
