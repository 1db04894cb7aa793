"""Merge methods: pure tensor functions of (pure vectors v_k, lambdas, parameters) -> delta.

theta = theta_0 + delta. No I/O, no config objects: the engine hands each method the float32
pure vectors of one tensor.

The registry: a method is one module in this package holding a frozen dataclass subclass of
``MergeMethod``, decorated ``@merge_method("<name>")``, whose fields are its parameters (the
keys of ``merge.<key>`` besides the common method, lam, lams and anchor) and whose ``check``
refuses bad values, plus one YAML ``conf/merge/<name>.yaml``. ``METHODS`` finds the modules
itself; the config validation, the resume key and the report's columns read it.
``merge.method`` may also be a dotted path ``package.module.Class`` to a method outside LATA.

A method is a sparsifier times a consensus (docs/method.md, "Merge methods and weightings"):
- the sparsifier: ``prepare`` computes, from the whole tensor, what each expert's drop needs
  (one entry per expert), and ``kept(v, state_k, start, stop)`` is the sparsified slice of one
  expert's vector;
- ``contributions``: the kept values scaled by lambda_k, u_k = lambda_k * kept(v_k) (the one
  place the lambdas are applied; no multiply where lambda_k is exactly 1.0);
- the consensus combines the u_k: ``summed`` (sum_k u_k) or ``disjoint_mean`` (TIES sign
  election and mean over the agreeing experts). ``ties_variant(Base, "<name>")`` is the method
  with Base's sparsifier and the TIES consensus, registered in one line.

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

from lata.registry import ConfigError, Registry

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

    #: the layer weight w_k of each expert for this tensor (already in the vectors where the
    #: method ``scales_vectors``)
    weights: list[float]
    #: each expert's calibration statistic of this tensor (float32, CPU; None where it has none),
    #: for a method with a ``statistic``; else None
    statistics: list[torch.Tensor | None] | None

    def gram(self, row: int | None = None, *, columns: bool = False, anchored: bool = False) -> torch.Tensor:
        """sum v_i * v_j over the whole tensor (``row`` None), over each row of ``row`` values of
        the flattened tensor, or (``columns``) over each of the ``row`` columns of the tensor
        seen as [n / row, row]: float64 [rows, K, K] (``lata.selection.block_gram``).
        ``anchored``: of theta_0 + v_k (float32 sums) instead of v_k."""

    def blocks(self, fn: Callable[[list[torch.Tensor]], Any]) -> list:
        """``[fn(slices) for each fixed block of the flattened tensor, in order]``: the float32
        slices of the v_k over ``lata.selection.GRAM_BLOCK`` values (the same blocks whatever the
        engine's slicing)."""


class _WholeVectors:
    """``TensorVectors`` over already-computed whole tensors (``MergeMethod.delta``)."""

    def __init__(self, vectors: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
                 anchor: torch.Tensor | None = None, statistics: Sequence[torch.Tensor | None] | None = None):
        self.vectors = list(vectors)
        self.shape = self.vectors[0].shape
        self.weights = [1.0] * len(self.vectors) if weights is None else list(weights)
        self.anchor = anchor
        self.statistics = None if statistics is None else list(statistics)

    def kth_largest_magnitudes(self, k):
        from lata.selection import kth_largest_magnitude

        return [kth_largest_magnitude(v, k) for v in self.vectors]

    def each_magnitude(self, fn):
        return [fn(i, v.detach().reshape(-1).float().abs()) for i, v in enumerate(self.vectors)]

    def _part(self, anchored: bool = False):
        flat = [v.detach().reshape(-1).float() for v in self.vectors]
        if not anchored:
            return lambda start, stop: [v[start:stop] for v in flat]
        t0 = self.anchor.detach().reshape(-1).float()
        return lambda start, stop: [t0[start:stop] + v[start:stop] for v in flat]

    def gram(self, row=None, *, columns=False, anchored=False):
        from lata.selection import block_gram

        return block_gram(self._part(anchored), self.vectors[0].numel(), row, columns=columns)

    def blocks(self, fn):
        from lata.selection import each_block

        return each_block(self._part(), self.vectors[0].numel(), fn)


def summed(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_k u_k, in place in the first: u_1, then each further u_k added in order.

    Each sum is one rounded float operation, so the result is the same however the tensor is
    cut into chunks or threads.
    """
    total = None
    for u in us:
        total = u if total is None else total.add_(u)
    return total


def disjoint_mean(us: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sign election and disjoint mean of already-scaled contributions u_k.

    gamma = sign(sum_k u_k); the mean over the k with sign(u_k) = gamma and u_k != 0; 0 where
    no contribution agrees. Written without masks: u_k agrees exactly when relu(u_k * gamma) > 0
    (gamma is -1, 0 or 1, so the product is exact), and the mean is gamma * sum_k relu(u_k *
    gamma) / max(count, 1), the same sum as that of the agreeing u_k with the sign taken out.
    """
    us = list(us)
    gamma = us[0] + us[1] if len(us) > 1 else us[0].clone()
    for u in us[2:]:
        gamma.add_(u)
    gamma.sign_()
    total = count = None
    for u in us:
        agreeing = torch.mul(u, gamma).relu_()
        if total is None:
            total, count = agreeing, torch.sign(agreeing)
        else:
            total.add_(agreeing)
            count.add_(torch.sign(agreeing))
    return total.mul_(gamma).div_(count.clamp_(min=1.0))


@dataclass(frozen=True)
class MergeMethod:
    """Base: a sparsifier (``prepare``, ``kept``) times a ``consensus``; ``delta(vectors, lams,
    experts, tensor, thresholds)`` for one tensor. By default nothing is dropped and the
    consensus is the sum: task arithmetic."""

    name: ClassVar[str] = "base"
    #: how the lambda-scaled contributions u_k combine into the delta: ``summed`` or ``disjoint_mean``
    consensus: ClassVar[Callable[[Sequence[torch.Tensor]], torch.Tensor]] = staticmethod(summed)
    #: ``fused_chunk`` exists: a fused CPU kernel computes theta_0 + delta (``lata.accel.kernels``)
    fused: ClassVar[bool] = False
    #: mergekit's ``merge_method`` with the same steps (``lata.results.mergekit``); None: none has them
    mergekit: ClassVar[str | None] = None
    #: mergekit's ``normalize`` for it: true where LATA divides the agreeing experts' sum by
    #: their count after a sign election (mergekit divides by their weights' sum: the same
    #: where those weights are all 1)
    mergekit_normalize: ClassVar[bool] = False
    #: where the recipe puts lambda_k * w_{l,k}: ``weight`` (each model's per-block weight),
    #: ``t`` (two experts: the recipe's per-block t, ``mergekit_t``, with the first expert as
    #: mergekit's base model), ``lambda`` (each model's weight lambda_k and no base model:
    #: exported only where every w_{l,k} is 1) or ``none`` (mergekit's method takes no weights:
    #: exported only where every lambda_k * w_{l,k} is 1)
    mergekit_weights: ClassVar[str] = "weight"
    #: False: the engine hands over d_k = theta_k - theta_0 unscaled and the layer weights w_k
    #: in ``TensorVectors.weights`` (a method whose weights set an interpolation, not a scale)
    scales_vectors: ClassVar[bool] = True
    #: ``delta_chunk`` is also given theta_0's float32 slice (``anchor=``)
    uses_anchor: ClassVar[bool] = False
    #: how many experts the method merges (None: any number)
    experts: ClassVar[int | None] = None
    #: the calibration statistic it needs per expert (``lata.calibration.statistics.KINDS``:
    #: ``fisher`` or ``gram``), handed over in ``TensorVectors.statistics``; None: none
    statistic: ClassVar[str | None] = None

    def check(self) -> None:
        """Refuse bad parameter values (``lata.registry.ConfigError`` naming ``merge.<key>``)."""

    def check_experts(self, names: Sequence[str]) -> None:
        """Refuse a family whose number of experts the method cannot merge (``experts``)."""
        if self.experts is not None and len(names) != self.experts:
            raise ConfigError(f"merge={self.name} merges exactly {self.experts} experts; this family has "
                              f"{len(names)} ({', '.join(names) or 'none'}): choose {self.experts} in model.experts "
                              f"or another merge method")

    @property
    def global_density(self) -> float | None:
        """The fraction of each expert's whole-model |v_k| whose threshold ``prepare`` needs
        (``thresholds``), or None: the engine then computes no whole-model threshold."""
        return None

    def check_exportable(self, has_target: bool = False) -> None:
        """Refuse, naming the setting, a merge that no mergekit recipe can express
        (``export=mergekit``)."""
        if self.mergekit is None:
            raise ConfigError(f"export=mergekit: merge={self.name} has no mergekit counterpart")
        self.mergekit_parameters()  # refuses settings mergekit lacks
        if has_target:
            raise ConfigError("export=mergekit: mergekit adds the merged vectors to its base model, so a merge onto "
                              "model.target has no mergekit recipe")

    def mergekit_parameters(self) -> dict[str, Any]:
        """This method's parameters as mergekit names them, for each model
        (``lata.results.mergekit``); a ``ConfigError`` where mergekit has no counterpart for a
        setting."""
        return {}

    def mergekit_shared(self) -> dict[str, Any]:
        """The recipe's top-level ``parameters`` (those mergekit shares between the models)."""
        return {"normalize": self.mergekit_normalize}

    def mergekit_t(self, a1: float, a2: float) -> float:
        """mergekit's t for a block whose weights lambda_k * w_{l,k} are a1, a2 (``mergekit_weights``
        ``t`` only)."""
        raise NotImplementedError

    def prepare(self, vectors: TensorVectors, lams: Sequence[float], experts: Sequence[str], tensor: str,
                thresholds: Sequence[float] | None = None) -> Sequence[Any] | None:
        """What ``kept`` needs from the whole tensor: one entry per expert, or None (nothing)."""
        return None

    def kept(self, v: torch.Tensor, state: Any, start: int, stop: int) -> torch.Tensor:
        """The sparsified slice [start, stop) of one expert's vector v (scratch: may be
        overwritten and returned), given that expert's entry of ``prepare``. All of v, by default."""
        return v

    def contributions(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], state: Any, start: int,
                      stop: int) -> list[torch.Tensor]:
        """u_k = lambda_k * kept(v_k), in place in the kept values (lambda_k = 1.0: no multiply)."""
        states = [None] * len(vectors) if state is None else state
        kept = [self.kept(v, s, start, stop) for v, s in zip(vectors, states)]
        return [u.mul_(lam) if lam != 1.0 else u for u, lam in zip(kept, lams)]

    def delta_chunk(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
                    tensor: str, state: Any, start: int, stop: int) -> torch.Tensor:
        """The delta of elements [start, stop) of the flattened tensor, from the vectors' slices:
        the consensus of the contributions.

        The vectors are scratch: the method may overwrite them (and return one of them).
        """
        return self.consensus(self.contributions(vectors, lams, state, start, stop))

    def fused_chunk(self, slices: Any, lams: Sequence[float], state: Any, start: int, stop: int) -> int:
        """theta_0 + delta of elements [start, stop), written by a fused kernel into the output
        that ``slices`` (``lata.accel.kernels.FusedSlices``) holds: the same values as ``delta_chunk``
        plus theta_0. Returns 0 where every value written is finite."""
        raise NotImplementedError

    def delta(self, vectors: Sequence[torch.Tensor], lams: Sequence[float], experts: Sequence[str],
              tensor: str, thresholds: Sequence[float] | None = None, *, weights: Sequence[float] | None = None,
              anchor: torch.Tensor | None = None, statistics: Sequence[torch.Tensor | None] | None = None
              ) -> torch.Tensor:
        """The delta of one whole tensor. ``vectors``: the v_k (the d_k where the method does not
        ``scales_vectors``, with the layer weights in ``weights``); ``anchor``: theta_0, for a
        method that ``uses_anchor``; ``statistics``: each expert's, for a method with a
        ``statistic``."""
        shape = vectors[0].shape
        whole = _WholeVectors(vectors, weights, anchor, statistics)
        state = self.prepare(whole, lams, experts, tensor, thresholds)
        flat = [v.reshape(-1).clone() for v in vectors]  # delta_chunk may overwrite them
        extra = {"anchor": anchor.reshape(-1).float()} if self.uses_anchor else {}
        return self.delta_chunk(flat, lams, experts, tensor, state, 0, flat[0].numel(), **extra).view(shape)


def ties_variant(base: type, name: str, *, mergekit: str | None = None, register: bool = True) -> type:
    """The method with ``base``'s sparsifier, parameters and checks and the TIES consensus
    (``disjoint_mean``), a frozen dataclass named after ``name`` (``dare_ties`` -> ``DareTies``)
    and registered as ``name`` (``register=False``: not registered, for a method used by its
    dotted path). ``mergekit``: mergekit's method with the same steps (None: none); its
    ``normalize`` is true (the mean over the agreeing experts). It has no fused kernel."""
    class_name = "".join(part.capitalize() for part in name.split("_"))
    namespace = {"__module__": base.__module__, "__qualname__": class_name,
                 "__doc__": f"{base.__name__}'s kept values, lambda-scaled, then TIES sign election and disjoint mean.",
                 "consensus": staticmethod(disjoint_mean), "mergekit": mergekit, "mergekit_normalize": True,
                 "fused": False, "__annotations__": {}}
    variant = dataclass(frozen=True)(type(class_name, (base,), namespace))
    variant.name = name
    return merge_method(name)(variant) if register else variant
