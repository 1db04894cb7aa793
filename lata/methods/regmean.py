"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): each linear layer is the weight whose outputs are closest, in least squares, to every
expert's own outputs on that expert's inputs.

For a linear layer y = x W^T with W [out, in], G_k = sum x x^T over expert k's calibration inputs
(``lata.calibration.statistics``), and G~_k = G_k with its off-diagonal entries times ``alpha``:
  W = (sum_k lambda_k G~_k)^-1 sum_k lambda_k G~_k W_k      (W^T on both sides; the paper's W)
so that with alpha = 1 and one lambda W minimises sum_k ||X_k W^T - X_k W_k^T||^2. Around the
anchor, delta^T = (sum_k lambda_k G~_k)^-1 sum_k lambda_k G~_k v_k^T with v_k = w_{l,k} d_k (the
anchor's own part cancels). Every other tensor (embeddings, norms, the output head) is the
lambda-weighted average, delta = sum_k lambda_k v_k / sum_k lambda_k, as Model Soup.

Decisions:
- ``alpha`` default 0.5, MergeBench's setting for LLMs (the paper tunes it per model family, in
  [0, 1]); G_k is the plain sum over the examples' tokens, as the paper's (MergeBench divides by
  the token count, which weighs experts alike whatever their examples' lengths).
- The output head is averaged (the paper merges the transformer's linear layers, not a task head;
  its inputs are also the largest Gram matrices).
- The solve is float64 on the CPU (``torch.linalg.solve``; a singular sum, as where an input
  feature is always 0, falls back to the minimum-norm least-squares solution), the result float32.
- Memory per linear layer: the K Gram matrices (float32, 4 K in^2 bytes), their float64 sum and
  the float64 right-hand side and solution (8 in^2 + 16 in out bytes), and each expert's vector
  of the layer (4 K in out): a layer that needs more than the memory free is refused, naming it.
- lambdas must be > 0 in sum; a common lambda cancels (a sweep over ``merge.lam`` repeats one merge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lata.accel.compute import free_memory
from lata.methods import MergeMethod, merge_method, summed
from lata.methods.soup import lambda_total
from lata.registry import ConfigError, in_range


def reduced(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G with its off-diagonal entries times alpha (float64)."""
    g = gram.double()
    return g.mul(alpha).add_(torch.diag(torch.diagonal(g)).mul_(1 - alpha)) if alpha != 1.0 else g


def regmean_solution(grams, vectors, lams, alpha: float) -> torch.Tensor:
    """delta [out, in] = ((sum_k lam_k G~_k)^-1 sum_k lam_k G~_k v_k^T)^T, float64."""
    lhs = rhs = None
    for g, v, lam in zip(grams, vectors, lams):
        gk = reduced(g, alpha).mul_(lam)
        term = gk @ v.double().T
        lhs = gk if lhs is None else lhs.add_(gk)
        rhs = term if rhs is None else rhs.add_(term)
    try:
        return torch.linalg.solve(lhs, rhs).T
    except RuntimeError:  # singular: the minimum-norm least-squares solution
        return torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution.T


@merge_method("regmean")
@dataclass(frozen=True)
class RegMean(MergeMethod):
    """RegMean: each linear layer solved from the experts' input Gram matrices (off-diagonals
    times alpha); other tensors averaged."""

    alpha: float = 0.5
    statistic = "gram"

    def check(self):
        in_range("merge.alpha", self.alpha, 0.0, 1.0)

    def prepare(self, vectors, lams, experts, tensor, thresholds=None):
        """("solved", the delta flat float32) for a linear layer; ("mean", sum of lambdas) else."""
        grams = vectors.statistics or [None] * len(experts)
        shape = vectors.shape
        if len(shape) != 2 or any(g is None for g in grams):
            return "mean", lambda_total(lams, tensor)
        out_dim, in_dim = shape
        for expert, g in zip(experts, grams):
            if tuple(g.shape) != (in_dim, in_dim):
                raise ConfigError(f"merge=regmean: expert '{expert}'s Gram matrix for '{tensor}' is "
                                  f"{list(g.shape)}, not [{in_dim}, {in_dim}]")
        need = 4 * len(experts) * in_dim * (in_dim + out_dim) + 8 * in_dim * in_dim + 16 * in_dim * out_dim
        free = free_memory("cpu")
        if need > free:
            raise ConfigError(f"merge=regmean: layer '{tensor}' ([{out_dim}, {in_dim}], {len(experts)} experts) needs "
                              f"{need / 2**30:.1f} GiB for its solve, more than the {free / 2**30:.1f} GiB free")
        flat = torch.cat(vectors.blocks(lambda vs: torch.stack([v.cpu() for v in vs])), dim=1)
        whole = [flat[i].view(out_dim, in_dim) for i in range(len(experts))]
        return "solved", regmean_solution(grams, whole, lams, self.alpha).float().contiguous().view(-1)

    def delta_chunk(self, vectors, lams, experts, tensor, state, start, stop):
        mode, value = state
        if mode == "solved":
            return value[start:stop].to(vectors[0].device, copy=True)
        delta = summed(self.contributions(vectors, lams, None, start, stop))
        return delta if value == 1.0 else delta.div_(value)
