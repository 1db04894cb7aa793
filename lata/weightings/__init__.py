"""Layer weightings: layer similarities -> per-layer weights w_{l,k} (docs/method.md, "Layer weights").

Pure functions of numbers: no tensors, no I/O, no config objects. A weighting that takes its
numbers from a file (``explicit`` with a mergekit recipe) names it in ``inputs``; validation
(``lata.config.validate_weighting``) reads it once and hands its bytes to ``given``.

The registry: a weighting is one module in this package holding a frozen dataclass subclass of
``Weighting``, decorated ``@weighting("<name>")``, whose fields are its parameters (the keys of
``weighting.<key>`` besides the common name, normalize and rest_weight) and whose ``check``
refuses bad values, plus one YAML ``conf/weighting/<name>.yaml``. ``WEIGHTINGS`` finds the
modules itself. ``weighting.name`` may also be a dotted path to a weighting outside LATA.

Decisions the spec leaves open:
- ``normalize=mean`` with every weight 0 (nothing to rescale) is an error, not a division by 0.
- ``rest_weight`` (tensors outside the blocks: embeddings, final norm, head) is null by default:
  the weighting's own ``rest_default`` (1.0, the spec's; LiNeS: alpha).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from lata.registry import Registry, one_of

#: every layer weighting, by name (``weighting=<name>``)
WEIGHTINGS = Registry("weighting", "name", __name__)
weighting = WEIGHTINGS.register
NORMALIZE = ("none", "mean")


@dataclass(frozen=True)
class Weighting:
    """Base: ``weights_for(similarities)`` gives one expert's L layer weights."""

    name: ClassVar[str] = "base"
    #: its weights are learned from data by the run and handed over (``with_weights``)
    needs_learning: ClassVar[bool] = False

    def check(self) -> None:
        """Refuse bad parameter values (``lata.registry.ConfigError`` naming ``weighting.<key>``)."""

    def weights_for(self, similarities: Sequence[float]) -> list[float]:
        raise NotImplementedError

    def weights_of(self, expert: str, similarities: Sequence[float]) -> list[float]:
        """Expert ``expert``'s L layer weights (``weights_for``, unless a weighting needs the name)."""
        return self.weights_for(similarities)

    def inputs(self) -> dict[str, str]:
        """{config key: path} of the files this weighting takes its numbers from (none here)."""
        return {}

    def given(self, contents: dict[str, bytes]) -> "Weighting":
        """A copy holding what it needs from the bytes of its ``inputs``, parsed and checked
        (a field marked ``metadata={"given": True}``, not a config key)."""
        return self

    def rest_default(self) -> float:
        """The weight of tensors outside the blocks when ``weighting.rest_weight`` is null."""
        return 1.0

    def rest_weight(self, configured: float | None) -> float:
        """The weight of tensors outside the blocks: ``weighting.rest_weight``, or ``rest_default``."""
        return self.rest_default() if configured is None else float(configured)


def build_weighting(name: str, **params: Any) -> Weighting:
    """The checked weighting object for ``weighting.name`` and its own keys."""
    return WEIGHTINGS.build(name, params)


def layer_weights(similarities: Sequence[float], name: str, *, normalize: str = "none",
                  **params: Any) -> list[float]:
    """Weights of one expert's L layers from its similarities s_l to the instruction vector."""
    return normalized(build_weighting(name, **params).weights_for(list(similarities)), normalize)


def normalized(w: Sequence[float], normalize: str) -> list[float]:
    """The weights as ``weighting.normalize`` asks: none (as they are) or mean (mean 1)."""
    one_of("weighting.normalize", normalize, NORMALIZE)
    return mean_normalized(w) if normalize == "mean" else list(w)


def mean_normalized(w: Sequence[float]) -> list[float]:
    """Rescale so the mean over layers is 1."""
    mean = sum(w) / len(w)
    if mean == 0:
        raise ValueError("weighting.normalize=mean: every layer weight is 0, nothing to rescale")
    return [x / mean for x in w]
