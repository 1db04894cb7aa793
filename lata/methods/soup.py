"""Model Soup (MergeBench's baseline; mergekit's ``linear`` with ``normalize: true``): the
lambda-weighted average of the experts, delta = sum_k lambda_k v_k / sum_k lambda_k.

In LATA's terms theta = theta_0 + delta with v_k = w_{l,k} (theta_k - theta_0): with uniform
weights and lambda_k = 1 the merge is theta_0 + mean_k (theta_k - theta_0), the mean of the
experts' weights up to float rounding (mergekit's ``linear`` with every ``weight`` 1); lambda_k
plays mergekit's per-model ``weight``. With a LATA weighting the layer weight scales each v_k as
for every method, so each block moves from theta_0 by w_{l,k} times the average's move.

Decisions:
- The sums run over the experts the engine hands over for the tensor, those whose pure vector
  is not zero (lambda_k w_{l,k} != 0): where a weighting gives an expert the weight 0 in a block,
  that block is the average of the others. lambda_k = 0 drops an expert from both sums alike.
- sum_k lambda_k = 0 has no average: the merge is refused, naming the tensor.
- No parameters of its own: the weights are ``merge.lam`` / ``merge.lams``. mergekit's
  ``normalize: false`` (sum_k w_k theta_k, no base model) is no function of the pure vectors and
  has no counterpart here.
- ``export=mergekit`` writes mergekit's ``linear`` (``normalize: true``, no base model) with each
  expert's ``weight`` lambda_k, only where every layer weight (and ``rest_weight``) is 1: with
  per-block weights lambda_k w_{l,k} mergekit divides by their sum, another average.
"""

from __future__ import annotations

from dataclasses import dataclass

from lata.methods import MergeMethod, merge_method, summed
from lata.registry import ConfigError


def lambda_total(lams, tensor: str) -> float:
    """sum_k lambda_k, the average's denominator; a ``ConfigError`` where it is 0."""
    total = sum(lams)
    if total == 0:
        raise ConfigError(f"merge=soup divides by the sum of the lambdas, which is 0 for tensor '{tensor}' "
                          f"(lambdas {list(lams)}): choose merge.lams that do not cancel")
    return total


@merge_method("soup")
@dataclass(frozen=True)
class Soup(MergeMethod):
    """Model Soup: delta = sum_k lambda_k v_k / sum_k lambda_k, the sum in expert order, then one
    division (none where the lambdas sum to exactly 1)."""

    mergekit = "linear"
    mergekit_normalize = True
    mergekit_weights = "lambda"

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        lambda_total(lams, tensor)  # refused before any slice is computed
        return None

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        total = lambda_total(lams, tensor)
        delta = summed(self.contributions(vectors, lams, state, start, stop))
        return delta if total == 1.0 else delta.div_(total)
