"""LATA: Layer-Aware Task Arithmetic for merging language models.

Library use::

    from lata import Family, MergeConfig, WeightingConfig, plan_merge, merge_to_dir
    family = Family.open("base", "instruct", {"math": "math-expert", "code": "code-expert"})
    plan = plan_merge(family, MergeConfig(method="ties", density=0.2),
                      WeightingConfig(name="log_rank", drop=0.5))
    merge_to_dir(plan, "merged")            # or merge_into_model(plan, model) / merge_state_dict(plan)
"""

from lata.analysis import LayerAnalysis, layer_similarities
from lata.checkpoints import Checkpoint, CheckpointError
from lata.config import ConfigError, MergeConfig, WeightingConfig
from lata.engine import MergePlan, iter_merged, merge_into_model, merge_state_dict, merge_to_dir, plan_merge
from lata.family import Family
from lata.weighting import layer_weights

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "Family", "LayerAnalysis", "MergeConfig", "MergePlan",
    "WeightingConfig", "iter_merged", "layer_similarities", "layer_weights", "merge_into_model",
    "merge_state_dict", "merge_to_dir", "plan_merge",
]
