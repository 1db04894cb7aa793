"""An independent, whole-model (non-streaming) implementation of docs/method.md, for tests only.

It loads every state dict fully, concatenates layer vectors, ranks with numpy and trims with
torch.topk / sort, so it shares no code path with the streaming engine (except the seeded DARE
mask and DELLA's seeded draws, which define m_k and are tested statistically on their own).
Breadcrumbs keeps positions of a full sort (mergekit's way) where LATA selects two thresholds;
DELLA ranks with numpy's stable argsort where LATA sorts with torch. A method without a formula
here is refused (``merge`` raises ``ValueError``): a new method brings its own reference.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lata.methods.dare import keep_mask, mask_seed

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
#: the methods ``merge`` has a formula for
METHODS = ("ta", "ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")


def load(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def layer_index(name: str):
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def similarities(base, instruct, expert, L):
    sims = []
    for l in range(L):
        names = [n for n in base if layer_index(n) == l]
        tau_instr = torch.cat([(instruct[n].double() - base[n].double()).flatten() for n in names])
        tau_comp = torch.cat([(expert[n].double() - base[n].double()).flatten() for n in names])
        denom = tau_comp.norm() * tau_instr.norm()
        sims.append(0.0 if denom == 0 else float(tau_comp @ tau_instr / denom))
    return sims


def weights(sims, name, drop=0.5, threshold=0.95, normalize="none", explicit=None, alpha=0.5, beta=0.5,
            of="linear_rank", seed=0):
    L = len(sims)
    order = np.lexsort((np.arange(L), -np.asarray(sims)))  # by -s, then by index
    p = np.empty(L, dtype=int)
    p[order] = np.arange(L)
    D = int(math.floor(drop * L + 0.5))
    np.seterr(divide="ignore", invalid="ignore")  # np.where evaluates the dropped branch too
    if name == "uniform":
        w = np.ones(L)
    elif name == "threshold":
        w = np.where(np.asarray(sims) > threshold, 0.0, 1.0)
    elif name == "linear_rank":
        w = np.where(p < D, 0.0, (p - D + 1) / (L - D))
    elif name == "log_rank":
        w = np.where(p < D, 0.0, np.log(1 + (p - D + 1)) / np.log(1 + (L - D)))
    elif name == "explicit":
        w = np.asarray(explicit, dtype=float)
    elif name == "lines":
        w = alpha + beta * np.arange(L) / max(L - 1, 1)
    elif name == "shuffled":  # the rank weights, block l taking block order[l]'s
        import random

        order = list(range(L))
        random.Random(seed).shuffle(order)
        w = np.asarray(weights(sims, of, drop))[order]
    if normalize == "mean":
        w = w / w.mean()
    return [float(x) for x in w]


def _kth(v: torch.Tensor, density: float) -> torch.Tensor:
    """k-th largest |v| with k = ceil(density * n)."""
    k = max(1, math.ceil(round(density * v.numel(), 9)))
    return torch.sort(v.abs().flatten(), descending=True).values[k - 1]


def _elect(us: list[torch.Tensor]) -> torch.Tensor:
    s = torch.stack(us)
    gamma = torch.sign(s.sum(0))
    out = torch.zeros_like(s[0])
    count = torch.zeros_like(s[0])
    for u in us:
        agree = (torch.sign(u) == gamma) & (u != 0)
        out += u * agree
        count += agree
    return torch.where(count > 0, out / count.clamp(min=1), torch.zeros_like(out))


def _breadcrumbs(v: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep the values ranked n_top+1 .. n_top+kept by |v| from the top (mergekit's sort)."""
    n = v.numel()
    kept = max(1, math.ceil(round(density * n, 9)))
    top = min(math.floor(round(gamma * n, 9)), n - kept)
    order = torch.sort(v.abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(n)
    mask[order[top:top + kept]] = 1.0
    return v * mask.view(v.shape)


def _della_scale(d: torch.Tensor, density: float, epsilon: float, seed: int, expert: str, tensor: str) -> torch.Tensor:
    """1/p_i where kept, else 0: p_i linear in the stable rank of |d_i| over the tensor."""
    n = d.numel()
    ranks = np.empty(n)
    ranks[np.argsort(d.abs().flatten().numpy(), kind="stable")] = np.arange(n)
    p = torch.from_numpy((density - epsilon) + 2 * epsilon * ranks / max(n - 1, 1)).float()
    if n == 1:
        p[:] = density
    draws = torch.rand(n, generator=torch.Generator().manual_seed(mask_seed(seed, expert, tensor)))
    return torch.where(draws < p, 1.0 / p, torch.zeros(())).view(d.shape)


def merge(dirs: dict, method="ta", weighting="uniform", lam=1.0, lams=None, density=0.2, topk_scope="tensor",
          p=0.9, seed=0, anchor="instruct", drop=0.5, threshold=0.95, normalize="none", rest_weight=None,
          explicit=None, target=None, gamma=0.01, epsilon=0.15, alpha=0.5, beta=0.5,
          of="linear_rank") -> dict[str, torch.Tensor]:
    """``target``: a checkpoint directory the delta is added to (default: theta_0);
    ``rest_weight`` None: 1, or alpha for LiNeS. ``ValueError`` for a method not in ``METHODS``."""
    if method not in METHODS:
        raise ValueError(f"tests/reference.py has no reference for merge method {method!r}; "
                         f"it has: {', '.join(METHODS)}")
    base, instruct = load(dirs["base"]), load(dirs["instruct"])
    experts = {k: load(v) for k, v in dirs["experts"].items()}
    L = 1 + max(layer_index(n) for n in base if layer_index(n) is not None)
    theta0 = instruct if anchor == "instruct" else base
    lams = {k: (lams or {}).get(k, lam) for k in experts}
    # pure vectors, float32
    if rest_weight is None:
        rest_weight = alpha if weighting == "lines" else 1.0
    pure = {}
    for k, ex in experts.items():
        w = weights(similarities(base, instruct, ex, L), weighting, drop, threshold, normalize, explicit, alpha, beta,
                    of, seed)
        pure[k] = {n: (rest_weight if layer_index(n) is None else w[layer_index(n)])
                   * (ex[n].float() - theta0[n].float()) for n in theta0}
    if method == "ties" and topk_scope == "global":
        trimmed = {}
        for k, vec in pure.items():
            kth = _kth(torch.cat([t.flatten() for t in vec.values()]), density)
            trimmed[k] = {n: t * (t.abs() >= kth) for n, t in vec.items()}
    elif method == "ties":
        trimmed = {k: {n: t * (t.abs() >= _kth(t, density)) for n, t in vec.items()} for k, vec in pure.items()}
    out = {}
    added = theta0 if target is None else load(target)
    for n in theta0:
        if method == "ta":
            delta = sum(lams[k] * pure[k][n] for k in experts)
        elif method == "ties":
            delta = _elect([lams[k] * trimmed[k][n] for k in experts])
        elif method.startswith("breadcrumbs"):
            us = [lams[k] * _breadcrumbs(pure[k][n], density, gamma) for k in experts]
            delta = _elect(us) if method == "breadcrumbs_ties" else sum(us)
        elif method.startswith("della"):
            us = [lams[k] * pure[k][n] * _della_scale(experts[k][n].float() - theta0[n].float(), density, epsilon,
                                                      seed, k, n) for k in experts]
            delta = _elect(us) if method == "della" else sum(us)
        else:  # dare, dare_ties
            us = [lams[k] * keep_mask(pure[k][n].shape, p, seed, k, n) * pure[k][n] / (1 - p) for k in experts]
            delta = sum(us) if method == "dare" else _elect(us)
        out[n] = (added[n].float() + delta).to(added[n].dtype)
    return out
