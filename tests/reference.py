"""An independent, whole-model (non-streaming) implementation of LATA_SPEC, for tests only.

It loads every state dict fully, concatenates layer vectors, ranks with numpy and trims with
torch.topk / sort, so it shares no code path with the streaming engine (except the seeded DARE
mask, which is the spec's definition of m_k and is tested statistically on its own).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lata.methods.dare import keep_mask

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


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


def weights(sims, name, drop=0.5, threshold=0.95, normalize="none", explicit=None):
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


def merge(dirs: dict, method="ta", weighting="uniform", lam=1.0, lams=None, density=0.2, topk_scope="tensor",
          p=0.9, seed=0, anchor="instruct", drop=0.5, threshold=0.95, normalize="none", rest_weight=1.0,
          explicit=None, target=None) -> dict[str, torch.Tensor]:
    """``target``: a checkpoint directory the delta is added to (default: theta_0)."""
    base, instruct = load(dirs["base"]), load(dirs["instruct"])
    experts = {k: load(v) for k, v in dirs["experts"].items()}
    L = 1 + max(layer_index(n) for n in base if layer_index(n) is not None)
    theta0 = instruct if anchor == "instruct" else base
    lams = {k: (lams or {}).get(k, lam) for k in experts}
    # pure vectors, float32
    pure = {}
    for k, ex in experts.items():
        w = weights(similarities(base, instruct, ex, L), weighting, drop, threshold, normalize, explicit)
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
        else:
            us = [lams[k] * keep_mask(pure[k][n].shape, p, seed, k, n) * pure[k][n] / (1 - p) for k in experts]
            delta = sum(us) if method == "dare" else _elect(us)
        out[n] = (added[n].float() + delta).to(added[n].dtype)
    return out
