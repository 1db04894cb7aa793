"""Pass 2: stream tensors through a merge method into a directory, a state dict, or a model.

The one place that knows the order of work. For each tensor (grouped by the anchor's shard):
read theta_0 and every theta_k, form the pure vectors v_k = w * (theta_k - theta_0) in float32
on ``device``, ask the method for the delta, and hand theta_0 + delta, cast to the output
dtype, to the sink. Memory holds one tensor per expert at a time, never a whole model.

With anchor=instruct, theta_k - theta_0 is the task vector tau_k; with anchor=base it is the
complex vector tau_comp_k, exactly as LATA_SPEC defines them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from lata.analysis import LayerAnalysis, layer_similarities
from lata.atomic import atomic_directory, check_writable_dir
from lata.checkpoints import TORCH_DTYPES, ShardedWriter, copy_support_files, torch_dtype_of
from lata.config import (MergeConfig, WeightingConfig, parse_size, validate_lams, validate_merge,
                         validate_weighting)
from lata.family import Family
from lata.methods import MergeMethod, build_method
from lata.methods.ties import global_threshold
from lata.weighting import layer_weights


@dataclass
class MergePlan:
    """Everything pass 2 needs: the family, the method, per-layer weights and lambdas."""

    family: Family
    method: MergeMethod
    weights: dict[str, list[float]]  # expert -> one weight per layer
    lams: dict[str, float]
    rest_weight: float
    anchor: str
    analysis: LayerAnalysis
    device: str = "cpu"
    thresholds: dict[str, float] | None = None  # TIES global scope: expert -> |v| threshold

    @property
    def experts(self) -> list[str]:
        return self.family.expert_names

    def weight(self, expert: str, name: str) -> float:
        layer = self.family.layer_of(name)
        return self.rest_weight if layer is None else self.weights[expert][layer]

    def pure_vectors(self, name: str, theta0: torch.Tensor) -> list[torch.Tensor]:
        """v_k = w_{l,k} (theta_k - theta_0) for one tensor, float32 on the plan's device."""
        vectors = []
        for k, ckpt in self.family.experts.items():
            v = ckpt.get(name).to(self.device, torch.float32) - theta0
            vectors.append(v.mul_(self.weight(k, name)))
        return vectors

    def merged_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta_0 + delta in float32 on device, the stored theta_0) for one tensor."""
        stored = self.family.anchor(self.anchor).get(name)
        if not stored.is_floating_point():
            return stored, stored
        theta0 = stored.to(self.device, torch.float32)
        delta = self.method.delta(self.pure_vectors(name, theta0), [self.lams[k] for k in self.experts],
                                  self.experts, name,
                                  None if self.thresholds is None else [self.thresholds[k] for k in self.experts])
        return theta0 + delta, stored  # never in place: ``stored`` may share memory with the file map


def plan_merge(family: Family, merge: MergeConfig | None = None, weighting: WeightingConfig | None = None,
               *, device: str = "cpu", analysis: LayerAnalysis | None = None, progress: bool = True) -> MergePlan:
    """Run pass 1 (unless ``analysis`` is given), derive the layer weights and build the plan."""
    merge = merge if merge is not None else MergeConfig()
    weighting = weighting if weighting is not None else WeightingConfig()
    validate_merge(merge)
    validate_weighting(weighting)
    validate_lams(merge.lams, family.expert_names)
    if analysis is None:
        analysis = layer_similarities(family, device=device, progress=progress)
    sims = analysis.similarities
    weights = {
        k: layer_weights(sims[k], weighting.name, drop=weighting.drop, threshold=weighting.threshold,
                         normalize=weighting.normalize,
                         weights=None if weighting.weights is None else list(weighting.weights))
        for k in family.experts
    }
    plan = MergePlan(
        family=family,
        method=build_method(merge.method, density=merge.density, topk_scope=merge.topk_scope,
                            p=merge.p, seed=merge.seed),
        weights=weights,
        lams={k: float(merge.lams.get(k, merge.lam)) for k in family.experts},
        rest_weight=float(weighting.rest_weight),
        anchor=merge.anchor,
        analysis=analysis,
        device=device,
    )
    if plan.method.needs_global_thresholds:
        plan.thresholds = {k: global_threshold(_expert_vectors(plan, k), merge.density) for k in family.experts}
    return plan


def _expert_vectors(plan: MergePlan, expert: str):
    """A re-iterable stream of expert k's pure vectors, tensor by tensor (for global top-k)."""
    anchor, ckpt = plan.family.anchor(plan.anchor), plan.family.experts[expert]

    def stream():
        for name in plan.family.tensor_names:
            theta0 = anchor.get(name)
            if theta0.is_floating_point():
                theta0 = theta0.to(plan.device, torch.float32)
                yield (ckpt.get(name).to(plan.device, torch.float32) - theta0).mul_(plan.weight(expert, name))

    return stream


def iter_merged(plan: MergePlan, out_dtype: str | None = None, progress: bool = True
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor on CPU) in the output dtype: ``out_dtype`` or the anchor's."""
    target = TORCH_DTYPES[out_dtype] if out_dtype else None
    for name in tqdm(plan.family.tensor_names, desc=f"merge ({plan.method.name})", disable=not progress,
                     leave=False):
        merged, stored = plan.merged_tensor(name)
        if merged.is_floating_point():
            merged = merged.to("cpu", target or stored.dtype)
        yield name, merged


def merge_state_dict(plan: MergePlan, out_dtype: str | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """The merged model as a state dict (holds the whole output in memory: for small models)."""
    return dict(iter_merged(plan, out_dtype, progress))


def merge_to_dir(plan: MergePlan, out_dir: str | os.PathLike, *, out_dtype: str | None = None,
                 overwrite: bool = False, shard_size: str | int = "2GB", progress: bool = True) -> Path:
    """Write the merged model as a sharded safetensors HF checkpoint, atomically.

    Config, generation config and tokenizer come from the anchor model. The checkpoint is built
    in a temporary sibling directory and renamed to ``out_dir`` only when whole.
    """
    max_bytes = parse_size(shard_size, key="shard_size")
    anchor = plan.family.anchor(plan.anchor)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_bytes)
        for name, tensor in iter_merged(plan, out_dtype, progress):
            writer.add(name, tensor)
        writer.finish()
        copy_support_files(anchor.path, tmp, dtype=out_dtype or _anchor_dtype_name(plan))
    return Path(out_dir)


def _anchor_dtype_name(plan: MergePlan) -> str | None:
    """The dtype of the anchor's floating tensors, as config.json spells it."""
    anchor = plan.family.anchor(plan.anchor)
    for name in plan.family.tensor_names:
        dtype = torch_dtype_of(anchor.dtype_name(name))
        if dtype is not None:
            return str(dtype).removeprefix("torch.")
    return None


def merge_into_model(plan: MergePlan, model: torch.nn.Module, progress: bool = False) -> torch.nn.Module:
    """Copy the merged tensors into an already-loaded model, in place (no save, no reload).

    Tensors keep the model's own dtype and device; tied weights are updated once, via their
    canonical tensor. Checkpoint names are matched to the model's state dict directly or under
    the model's ``base_model_prefix`` (GPT-2 style checkpoints).
    """
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    with torch.no_grad():
        for name, tensor in iter_merged(plan, None, progress):
            key = name if name in state else f"{prefix}.{name}"
            if key not in state:
                raise KeyError(f"merged tensor '{name}' has no counterpart in the model's state dict")
            target = state[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor '{name}': model has shape {list(target.shape)}, merge gives {list(tensor.shape)}")
            target.data.copy_(tensor.to(target.device, target.dtype))
    return model


__all__ = ["MergePlan", "plan_merge", "iter_merged", "merge_state_dict", "merge_to_dir", "merge_into_model",
           "check_writable_dir"]
