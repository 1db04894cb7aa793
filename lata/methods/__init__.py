"""Merge methods: pure tensor functions of (pure vectors v_k, lambdas, parameters) -> delta.

theta = theta_0 + delta. No I/O, no config objects: the engine hands each method the float32
pure vectors of one tensor.

The registry: a method is one module in this package holding a frozen dataclass subclass of
``MergeMethod``, decorated ``@merge_method("<name>")``, whose fields are its parameters (the
keys of ``merge.<key>`` besides the common method, lam, lams and anchor) and whose ``check``
refuses bad values, plus one YAML ``conf/merge/<name>.yaml``. ``METHODS`` finds the modules
itself; the config validation, the resume key and the report's columns read it.
``merge.method`` may also be a dotted path ``package.module.Class`` to a method outside LATA.

Every method is elementwise once it has seen the whole tensor: ``prepare`` takes what needs the
whole tensor, through the one ``TensorVectors`` interface the engine offers (each expert's k-th
largest magnitude for TIES and Breadcrumbs; each expert's magnitudes for DELLA's ranks; a
whole-model magnitude threshold where ``global_density`` asks for one), and ``delta_chunk``
computes the delta of any slice of the flattened tensor from the vectors' values in that slice.
The engine streams large tensors through ``delta_chunk`` in slices (bounded memory,
cache-sized work); ``delta`` is the same on the whole tensor at once, and gives the same values
whatever the slicing. A method with ``fused = True`` also has ``fused_chunk``: the same slice
computed by a numba kernel (``lata.accel.kernels``) straight from the stored inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

from lata.registry import Registry

#: every merge method, by name (``merge=<name>``)
METHODS = Registry("merge", "method", __name__)
merge_method = METHODS.register


class TensorVectors(Protocol):
    """The pure vectors v_k = w_k * d_k of one tensor (d_k = theta_k - theta_0, one layer
    weight w_k per tensor), as the engine offers them to ``prepare``."""

    shape: torch.Size

    def kth_largest_magnitudes(self, k: int) -> list[float]:
        """The k-th largest |v_k| of each expert's vector, exactly."""

    def each_magnitude(self, fn: Callable[[int, torch.Tensor], Any]) -> list:
        """``[fn(i, |d_i|) for each expert i]``: |d_i| flat float32 on the compute device, in a
        scratch buffer ``fn`` may reorder. Its order is that of |v_i| (w_i scales every value
        of the tensor alike), ties apart."""


class _WholeVectors:
    """``TensorVectors`` over already-computed whole tensors (``MergeMethod.delta``, w = 1)."""

    def __init__(self, vectors: Sequence[torch.Tensor]):
        self.vectors = list(vectors)
        self.shape = self.vectors[0].shape

    def kth_largest_magnitudes(self, k):
        from lata.selection import kth_largest_magnitude

        return [kth_largest_magnitude(v, k) for v in self.vectors]

    def each_magnitude(self, fn):
        return [fn(i, v.detach().reshape(-1).float().abs()) for i, v in enumerate(self.vectors)]


@dataclass(frozen=True)
class MergeMethod:
    """Base: ``prepare`` + ``delta_chunk``; ``delta(vectors, lams, experts, tensor, thresholds)`` for one tensor."""

    name: ClassVar[str] = "base"
    #: ``fused_chunk`` exists: a fused CPU kernel computes theta_0 + delta (``lata.accel.kernels``)
    fused: ClassVar[bool] = False
    #: mergekit's ``merge_method`` with the same steps (``lata.export``); None: none has them
    mergekit: ClassVar[str | None] = None
    #: mergekit's ``normalize`` for it: true where LATA divides the agreeing experts' sum by
    #: their count after a sign election (mergekit divides by their weights' sum: the same
    #: where those weights are all 1)
    mergekit_normalize: ClassVar[bool] = False

    def check(self) -> None:
        """Refuse bad parameter values (``lata.registry.ConfigError`` naming ``merge.<key>``)."""

    @property
    def global_density(self) -> float | None:
        """The fraction of each expert's whole-model |v_k| whose threshold ``prepare`` needs
        (``thresholds``), or None: the engine then computes no whole-model threshold."""
        return None

    def mergekit_parameters(self) -> dict[str, Any]:
        """This method's parameters as mergekit names them, for each model (``lata.export``);
        a ``ConfigError`` where mergekit has no counterpart for a setting."""
        return {}

    def prepare(self, vectors: TensorVectors, lams: Sequence[float], experts: Sequence[str], tensor: str,
                thresholds: Sequence[float] | None = None) -> Any:
        """What ``delta_chunk`` needs from the whole tensor (nothing, by default)."""
        return None

    def delta_chunk(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
                    tensor: str, state: Any, start: int, stop: int) -> torch.Tensor:
        """The delta of elements [start, stop) of the flattened tensor, from the vectors' slices.

        The vectors are scratch: the method may overwrite them (and return one of them).
        """
        raise NotImplementedError

    def fused_chunk(self, slices: Any, lams: Sequence[float], state: Any, start: int, stop: int) -> int:
        """theta_0 + delta of elements [start, stop), written by a fused kernel into the output
        that ``slices`` (``lata.accel.kernels.FusedSlices``) holds: the same values as ``delta_chunk``
        plus theta_0. Returns 0 where every value written is finite."""
        raise NotImplementedError

    def delta(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
              tensor: str, thresholds: Sequence[float] | None = None) -> torch.Tensor:
        shape = vectors[0].shape
        state = self.prepare(_WholeVectors(vectors), lams, experts, tensor, thresholds)
        flat = [v.reshape(-1).clone() for v in vectors]  # delta_chunk may overwrite them
        return self.delta_chunk(flat, lams, experts, tensor, state, 0, flat[0].numel()).view(shape)


def build_method(method: str, **params: Any) -> MergeMethod:
    """The checked method object for ``merge.method`` and its own keys (``ConfigError`` naming
    the key for an unknown method, an unknown key or a bad value)."""
    return METHODS.build(method, params)
