"""The embedded model zoo: a real base -> instruct -> experts (math, code, ua) Llama family,
trained locally from Shakespeare, standard-library code and generated chat tasks (no network).

    from lata.zoo import build_zoo, load_preset
    family = build_zoo(load_preset("small"), "~/.cache/lata")
    family.base, family.instruct, family.experts["math"], family.heldout
"""

from lata.zoo.build import ZOO_CODE_VERSION, ZooFamily, build_zoo, family_at
from lata.zoo.presets import EXPERTS, ROLES, ZooConfig, load_preset, to_zoo_config

__all__ = ["EXPERTS", "ROLES", "ZOO_CODE_VERSION", "ZooConfig", "ZooFamily", "build_zoo",
           "family_at", "load_preset", "to_zoo_config", "zoo_report"]


def zoo_report(*args, **kwargs):
    """See ``lata.zoo.report.zoo_report`` (imported lazily)."""
    from lata.zoo.report import zoo_report as _report

    return _report(*args, **kwargs)
