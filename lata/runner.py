"""One job: family -> layer analysis -> weights -> merge -> outputs in the run directory.

Writes to ``run_dir``: ``config.yaml`` (resolved), ``layer_analysis.json``/``.csv`` (per expert
and layer: similarity, norms, weight), ``layer_analysis.png`` (heatmap) and, with
``save_model``, the merged checkpoint. Every file is written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lata.atomic import check_writable_dir, write_json_atomic, write_text_atomic
from lata.config import ConfigError, validate
from lata.engine import MergePlan, merge_to_dir, plan_merge
from lata.family import Family
from lata.plots import layer_heatmap

log = logging.getLogger("lata")


@dataclass(frozen=True)
class FamilyPaths:
    base: str
    instruct: str
    experts: dict[str, str]


def family_paths(model: Any, cache_dir: str, progress: bool = True) -> FamilyPaths:
    """The checkpoint locations of ``cfg.model``: given paths, or an embedded family built/cached."""
    if model.embedded is None:
        return FamilyPaths(str(model.base), str(model.instruct), {k: str(v) for k, v in model.experts.items()})
    if model.embedded == "tiny":
        from lata.zoo.tiny import build_tiny_family

        built = build_tiny_family(Path(cache_dir), progress=progress)
        experts = {k: str(v) for k, v in built.experts.items()}
        if model.experts:  # a subset of the embedded experts
            unknown = sorted(set(model.experts) - set(experts))
            if unknown:
                raise ConfigError(f"model.experts.{unknown[0]}: the tiny family has experts {', '.join(experts)}")
            experts = {k: experts[k] for k in model.experts}
        return FamilyPaths(str(built.base), str(built.instruct), experts)
    raise ConfigError(f"model.embedded={model.embedded!r} is not allowed; choose one of: tiny (or null)")


def format_layer_table(plan: MergePlan) -> str:
    """Similarity / weight per expert and layer, as aligned text."""
    sims = plan.analysis.similarities
    L = plan.family.num_layers
    lines = ["expert      " + " ".join(f"{f'L{l}':>6}" for l in range(L))]
    for k in plan.experts:
        lines.append(f"{k[:8]:<8} s  " + " ".join(f"{s:6.3f}" for s in sims[k]))
        lines.append(f"{'':<8} w  " + " ".join(f"{w:6.3f}" for w in plan.weights[k]))
    return "\n".join(lines)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the main job for a composed config; return a summary dict (also written to disk)."""
    validate(cfg)
    run_dir = Path(run_dir)
    if cfg.save_model:
        check_writable_dir(cfg.save_model, cfg.overwrite)  # refuse before any work
    paths = family_paths(cfg.model, cfg.paths.cache_dir, progress=cfg.progress)
    family = Family.open(paths.base, paths.instruct, paths.experts)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    summary: dict = {
        "family": {"base": paths.base, "instruct": paths.instruct, "experts": paths.experts,
                   "model_type": family.architecture.model_type, "num_layers": family.num_layers,
                   "tensors": len(family.tensor_names)},
        "merge": OmegaConf.to_container(cfg.merge, resolve=True) if isinstance(cfg.merge, DictConfig) else None,
        "weighting": OmegaConf.to_container(cfg.weighting, resolve=True) if isinstance(cfg.weighting, DictConfig) else None,
    }
    if cfg.dry_run:
        log.info("dry run: family of %s checked (%d layers, %d tensors); nothing merged",
                 family.architecture.model_type, family.num_layers, len(family.tensor_names))
        write_json_atomic(run_dir / "summary.json", summary)
        return summary
    plan = plan_merge(family, cfg.merge, cfg.weighting, device=cfg.device, progress=cfg.progress)
    write_json_atomic(run_dir / "layer_analysis.json", plan.analysis.to_dict(plan.weights))
    write_text_atomic(run_dir / "layer_analysis.csv", plan.analysis.to_csv(plan.weights))
    layer_heatmap(plan.analysis.similarities, plan.weights, run_dir / "layer_analysis.png",
                  title=f"{cfg.merge.method} + {cfg.weighting.name}: similarity to the instruction vector")
    log.info("layer analysis (s = similarity to the instruction vector, w = layer weight):\n%s",
             format_layer_table(plan))
    if cfg.save_model:
        out = merge_to_dir(plan, cfg.save_model, out_dtype=cfg.out_dtype, overwrite=cfg.overwrite,
                           shard_size=cfg.shard_size, progress=cfg.progress)
        summary["saved_model"] = str(out)
        log.info("merged model written to %s", out)
    else:
        log.info("save_model is null and benchmark=none: only the layer analysis was written")
    summary["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
