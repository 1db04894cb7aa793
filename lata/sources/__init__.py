"""Where a family's checkpoints come from: one source per ``model.embedded`` name.

Each source is a function ``(model, zoo, cache_dir, progress, device) -> FamilyPaths``,
registered under its name with ``@source(name)`` (``merges=False``: its model can only be
evaluated, ``merge=none``); ``family_paths`` looks ``cfg.model.embedded``
up here, so a new source is one decorated function, with no list to edit elsewhere:

  * ``null``: the directories or hub ids the config names (``model.base``, ``.instruct``, ``.experts``);
  * ``zoo``: the embedded model zoo, built once and cached (``lata.zoo``);
  * ``smollm2``: SmolLM2-135M-Instruct from its PyPI package, converted once (``lata.sources.pretrained``);
    a lone instruct model, evaluated with ``merge=none`` only.

The builders are imported when their source is used, so naming one costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lata.config import UNMERGED, ConfigError, role_map


@dataclass(frozen=True)
class FamilyPaths:
    base: str | None  # None: a lone instruct model (model=smollm2), evaluated with merge=none only
    instruct: str
    experts: dict[str, str]
    heldout: str | None = None  # an embedded family's held-out task data
    target: str | None = None  # model.target resolved: where the merged vectors are added (None: the anchor)

    def roles(self) -> dict[str, str]:
        """{role: path}: base (where there is one), instruct, the experts, the target (where set)."""
        return {**role_map(self.base or None, self.instruct, self.experts),
                **({"target": self.target} if self.target else {})}

    def role(self, which: str) -> str:
        roles = {k: v for k, v in self.roles().items() if k != "target"}
        if which not in roles:
            raise ConfigError(f"model.which={which!r} is not allowed; choose one of: {', '.join(roles)}")
        return roles[which]


Source = Callable[[Any, Any, Path, bool, str], FamilyPaths]
SOURCES: dict[str | None, Source] = {}
#: the sources whose model can only be evaluated (merge=none): a lone model, no base or experts
EVALUATION_ONLY: set[str | None] = set()


def source(name: str | None, merges: bool = True) -> Callable[[Source], Source]:
    """Register the decorated function as the source of ``model.embedded=name`` (None: null);
    ``merges=False``: a lone model, evaluated with ``merge=none`` only."""
    def register(fn: Source) -> Source:
        if name in SOURCES:
            raise ValueError(f"model source {name!r} is registered twice")
        SOURCES[name] = fn
        if not merges:
            EVALUATION_ONLY.add(name)
        return fn

    return register


def _source(model: Any) -> Source:
    fn = SOURCES.get(model.embedded)
    if fn is None:
        names = [name for name in SOURCES if name is not None]
        raise ConfigError(f"model.embedded={model.embedded!r} is not allowed; choose one of: {', '.join(names)}"
                          + (" (or null)" if None in SOURCES else ""))
    return fn


def check_merge(model: Any, method: str) -> None:
    """Refuse, before any checkpoint is resolved, to merge a model its source offers for
    evaluation only."""
    _source(model)
    if method != UNMERGED and model.embedded in EVALUATION_ONLY:
        raise ConfigError(f"model={model.name} is a single instruct model with no base or experts: it can only be "
                          f"evaluated (merge={UNMERGED}), not merged with merge={method}")


def family_paths(model: Any, zoo: Any, cache_dir: str, progress: bool = True,
                 device: str = "cpu") -> FamilyPaths:
    """The checkpoint locations of ``cfg.model``, from the source ``model.embedded`` names."""
    return _source(model)(model, zoo, Path(cache_dir), progress, device)


def target_path(model: Any, roles: dict[str, str]) -> str | None:
    """``model.target`` as a path: a role of the family (base, instruct or any expert it has, merged
    or not) by name, else a directory or hub id; None where it is unset (the anchor)."""
    target = model.get("target")
    if target is None or target == "":
        return None
    return roles.get(str(target), str(target))


def named_inputs(model: Any) -> dict[str, str]:
    """{role: path} of the checkpoints a config names itself (an embedded family's are known once
    built; none here)."""
    if model.embedded is not None:
        return {}
    experts = {k: str(v) for k, v in model.experts.items()}
    named = role_map(str(model.base), str(model.instruct), {f"expert '{k}'": v for k, v in experts.items()})
    target = target_path(model, role_map(named["base"], named["instruct"], experts))
    if target is not None and target not in named.values():
        named["target"] = target
    return named


# --------------------------------------------------------------------------- the sources

@source(None)
def given_paths(model: Any, zoo: Any, cache_dir: Path, progress: bool, device: str) -> FamilyPaths:
    """The directories or hub ids the config names."""
    experts = {k: str(v) for k, v in model.experts.items()}
    roles = role_map(str(model.base), str(model.instruct), experts)
    return FamilyPaths(roles["base"], roles["instruct"], experts, target=target_path(model, roles))


@source("zoo")
def embedded_zoo(model: Any, zoo: Any, cache_dir: Path, progress: bool, device: str) -> FamilyPaths:
    """The embedded zoo ``zoo`` describes, built or reused from the cache; ``model.experts``, when
    set, picks a subset of its experts."""
    from lata.zoo import build_zoo

    built = build_zoo(zoo, cache_dir, progress=progress, device=device)
    experts = {k: str(v) for k, v in built.experts.items()}
    target = target_path(model, {k: str(v) for k, v in built.roles().items()})
    if model.experts:  # a subset of the zoo's experts
        unknown = sorted(set(model.experts) - set(experts))
        if unknown:
            raise ConfigError(f"model.experts.{unknown[0]}: the zoo has experts {', '.join(experts)}")
        experts = {k: experts[k] for k in model.experts}
    return FamilyPaths(str(built.base), str(built.instruct), experts, str(built.heldout), target)


@source("smollm2", merges=False)
def smollm2(model: Any, zoo: Any, cache_dir: Path, progress: bool, device: str) -> FamilyPaths:
    """SmolLM2-135M-Instruct alone: no base, no experts."""
    from lata.sources.pretrained import smollm2_checkpoint

    return FamilyPaths(None, str(smollm2_checkpoint(cache_dir, progress=progress)), {})
