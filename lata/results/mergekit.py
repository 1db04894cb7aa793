"""mergekit recipes: LATA's layer weights written as a mergekit YAML (``export=mergekit``). A
recipe's per-layer weights are read back by ``weighting=explicit weighting.from_mergekit=...``
(``lata.weightings.explicit``).

The recipe merges the same family with mergekit's method of the same steps
(``MergeMethod.mergekit``): ``base_model`` is LATA's anchor, each expert a model (a LoRA adapter
as mergekit's ``instruct+adapter``) whose ``weight`` is lambda_k * w_{l,k}, given as mergekit's
per-layer list (one value per block, which mergekit spreads over the blocks as a gradient:
block l gets entry l) after one entry per tensor outside the blocks (embeddings, final norm,
lm_head) with lambda_k * rest_weight, named by a filter on its exact name (mergekit would
otherwise give them a value from the list's end). The method's own parameters follow
(``MergeMethod.mergekit_parameters``), arithmetic in float32, output in the anchor's dtype.

What mergekit then computes, against LATA: docs/method.md, "mergekit recipes".
"""

from __future__ import annotations

from typing import Any

import yaml



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


def recipe_yaml(plan) -> str:
    header = (f"# mergekit recipe written by LATA: merge={plan.method.name}, weight = lambda_k * w_(l,k) per block\n"
              f"# (LATA's layer weights), the tensors outside the blocks by name. Run: mergekit-yaml THIS_FILE OUT\n")
    return header + yaml.safe_dump(mergekit_recipe(plan), sort_keys=False, width=120)


def _reference(ckpt) -> str:
    """How mergekit names an expert: its path or hub id; an adapter as ``instruct+adapter``."""
    instruct = getattr(ckpt, "instruct", None)
    return f"{instruct.source}+{ckpt.source}" if instruct is not None else ckpt.source
