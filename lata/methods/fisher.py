"""Fisher merging (Matena & Raffel, NeurIPS 2022): each parameter is the average of the experts'
values weighted by their diagonal Fisher information, F_k (``lata.calibration.statistics``: the
squared gradients of the log-likelihood of expert k's answers on its calibration examples).

With v_k = w_{l,k} d_k (the layer-weighted pure vectors) and lambda_k the experts' weights:
  delta = sum_k lambda_k F_k v_k / (sum_k lambda_k F_k + epsilon * mean(sum_k lambda_k F_k)),
the means over the tensor. With w = 1 and epsilon 0 this is the paper's
theta = sum_k lambda_k F_k theta_k / sum_k lambda_k F_k; the epsilon term is the anchor taking part
with a Fisher of epsilon times the tensor's mean, so a parameter that no expert's Fisher covers
(F_k = 0 for every k: an embedding row no example uses) keeps the anchor's value.

Decisions:
- epsilon is relative to each tensor's mean Fisher (default 1e-6): the Fisher's scale changes
  with the model's size and the answers' lengths, where an absolute floor (the paper's code has
  one) would leave whole tensors at the anchor in one model and change nothing in another.
- No normalization of each expert's Fisher (the paper's formula): an expert whose answers are
  longer has a larger Fisher. ``merge.lams`` weighs the experts (lambdas must be >= 0); a common
  lambda cancels, so a sweep over ``merge.lam`` repeats one merge.
- The experts handed over are those whose v_k is not zero (lambda_k w_{l,k} != 0); on a vocabulary
  tensor merged on its shared rows, the Fisher's first rows are used.
- A tensor with no Fisher in an expert's statistics (a buffer the model does not train) is
  refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lata.methods import MergeMethod, merge_method
from lata.registry import ConfigError, in_range


@merge_method("fisher")
@dataclass(frozen=True)
class Fisher(MergeMethod):
    """Fisher merging: the Fisher-weighted average of the v_k, the anchor weighted epsilon * mean."""

    epsilon: float = 1e-6
    statistic = "fisher"

    def check(self):
        in_range("merge.epsilon", self.epsilon, 0.0, float("inf"))

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """([lambda_k F_k] flat, the denominator flat), float32 on the vectors' device."""
        if any(lam < 0 for lam in lams):
            raise ConfigError(f"merge=fisher weighs the experts by their lambdas, which must be >= 0 (tensor '{tensor}': "
                              f"{list(lams)})")
        n = vectors.shape.numel()
        scaled = []
        for expert, lam, f in zip(experts, lams, vectors.statistics):
            if f is None or f.numel() < n:
                raise ConfigError(f"merge=fisher: expert '{expert}' has no Fisher for tensor '{tensor}' in its "
                                  f"calibration statistics")
            scaled.append(f.reshape(-1)[:n].mul(lam))
        total = scaled[0].clone()
        for f in scaled[1:]:
            total.add_(f)
        floor = self.epsilon * float(total.double().mean())
        return scaled, total.add_(floor) if floor > 0 else total

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        scaled, total = state
        device = vectors[0].device
        out = vectors[0].mul_(scaled[0][start:stop].to(device))
        for v, f in zip(vectors[1:], scaled[1:]):
            out.add_(v.mul_(f[start:stop].to(device)))
        den = total[start:stop].to(device)
        return torch.where(den > 0, out / den, torch.zeros((), device=device))
