"""LATA: Layer-Aware Task Arithmetic for merging language models.

Library use::

    from lata import Family, MergeConfig, WeightingConfig, plan_merge, merge_to_dir
    family = Family.open("base", "instruct", {"math": "math-expert", "code": "code-expert"})
    plan = plan_merge(family, MergeConfig(method="ties", density=0.2),
                      WeightingConfig(name="log_rank", drop=0.5))
    merge_to_dir(plan, "merged")            # or merge_into_model(plan, model) / merge_state_dict(plan)

The names below are imported on first use, so ``import lata.config`` or ``lata.results.plots`` does not
pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LayerAnalysis": "lata.analysis", "layer_similarities": "lata.analysis",
    "Checkpoint": "lata.io.checkpoints", "CheckpointError": "lata.io.files",
    "ConfigError": "lata.config", "MergeConfig": "lata.config", "WeightingConfig": "lata.config",
    "MergePlan": "lata.plan", "plan_merge": "lata.plan", "iter_merged": "lata.engine",
    "merge_into_model": "lata.sinks", "merge_state_dict": "lata.sinks", "merge_to_dir": "lata.sinks",
    "Family": "lata.family", "layer_weights": "lata.weightings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lata' has no attribute {name!r}")


if TYPE_CHECKING:
    from lata.analysis import LayerAnalysis, layer_similarities
    from lata.io.checkpoints import Checkpoint
    from lata.io.files import CheckpointError
    from lata.config import ConfigError, MergeConfig, WeightingConfig
    from lata.engine import iter_merged
    from lata.plan import MergePlan, plan_merge
    from lata.sinks import merge_into_model, merge_state_dict, merge_to_dir
    from lata.family import Family
    from lata.weightings import layer_weights
