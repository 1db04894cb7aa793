"""An independent, whole-model (non-streaming) implementation of docs/method.md, for tests only.

It loads every state dict fully, concatenates layer vectors, ranks with numpy and trims with
torch.topk / sort, so it shares no code path with the streaming engine (except the seeded DARE
mask and DELLA's seeded draws, which define m_k and are tested statistically on their own).
Breadcrumbs keeps positions of a full sort (mergekit's way) where LATA selects two thresholds;
DELLA ranks with numpy's stable argsort where LATA sorts with torch. Model Soup, Consensus TA and
Localize-and-Stitch are written from their formulas over stacked whole tensors (Localize-and-Stitch
finds its threshold with torch.topk). A method without a formula here is refused (``merge`` raises
``ValueError``): a new method brings its own reference. ``bend`` names a deliberate error in one
formula, for the mutation checks (tests/test_baselines.py).
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
METHODS = ("ta", "ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "soup",
           "consensus", "localize_stitch", "model_stock", "sce", "slerp", "nuslerp")
#: the deliberate errors ``merge(bend=...)`` can make, per method
BENDS = {"soup": ("all_lambdas", "expert_count", "no_division"),
         "consensus": ("strict_mask", "k_minus_one", "unscaled_masks"),
         "localize_stitch": ("no_overlap_division", "floor_count"),
         "sce": ("no_erase", "unmasked_weights"), "slerp": ("lerp", "swapped_t"),
         "nuslerp": ("lerp", "swapped_t")}


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


def _soup(vs: list, ls: list, bend=None) -> torch.Tensor:
    """sum_k l_k v_k / sum_k l_k over the given experts (``bend``: another denominator, or none)."""
    total = sum(l * v for l, v in zip(ls, vs))
    if bend == "no_division":
        return total
    return total / (len(ls) if bend == "expert_count" else sum(ls))


def _consensus(us: list, vs: list, tall_lambda: float, k: int, bend=None) -> torch.Tensor:
    """tau_MTL = sum u; masks |u_k| >= tall_lambda |tau_MTL - u_k| (on the unscaled v_k for
    ``unscaled_masks``); tau_MTL where at least k masks hold."""
    mtl = torch.stack(us).sum(0)
    on = torch.stack(vs).sum(0) if bend == "unscaled_masks" else mtl
    masks = []
    for x in (vs if bend == "unscaled_masks" else us):
        lhs, rhs = x.abs(), tall_lambda * (on - x).abs()
        masks.append((lhs > rhs) if bend == "strict_mask" else (lhs >= rhs))
    agree = torch.stack(masks).to(torch.int64).sum(0)
    return torch.where(agree >= (k - 1 if bend == "k_minus_one" else k), mtl, torch.zeros(()))


def _localized(v: torch.Tensor, density: float, bend=None) -> torch.Tensor:
    """1.0 where v is among the top ceil(density * n) by |v| (ties with the last kept too) and
    non-zero, else 0.0 (``floor_count``: floor(density * n) kept)."""
    flat = v.abs().flatten()
    k = int(density * flat.numel()) if bend == "floor_count" else math.ceil(round(density * flat.numel(), 9))
    cut = torch.topk(flat, max(k, 1)).values.min()
    return ((v.abs() >= cut) & (v != 0)).float()


def _stitch(vs: list, ls: list, density: float, bend=None) -> torch.Tensor:
    """sum_k l_k v_k m_k / max(sum_k m_k, 1), m_k each expert's localized mask."""
    masks = [_localized(v, density, bend) for v in vs]
    total = sum(l * v * m for l, v, m in zip(ls, vs, masks))
    return total if bend == "no_overlap_division" else total / torch.stack(masks).sum(0).clamp(min=1)


def _model_stock(vs: list, ls: list, filter_wise: bool) -> torch.Tensor:
    """t * mean_k(l_k v_k), t = N c / (1 + (N - 1) c) from the mean pairwise cosine c of the v_k
    (numpy float64; per row of a matrix with ``filter_wise``); t = 1 for one vector."""
    shape = vs[0].shape
    rows = [v.double().numpy().reshape(shape[0] if filter_wise and len(shape) > 1 else 1, -1) for v in vs]
    n = len(rows)
    if n == 1:
        t = np.ones((rows[0].shape[0], 1))
    else:
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                norms = np.maximum(np.linalg.norm(rows[i], axis=1) * np.linalg.norm(rows[j], axis=1), 1e-6)
                cos.append(np.clip((rows[i] * rows[j]).sum(axis=1) / norms, -1.0, 1.0))
        c = np.mean(cos, axis=0)[:, None]
        t = n * c / (1 + (n - 1) * c)
    mean = sum(l * r for l, r in zip(ls, rows)) / n
    return torch.from_numpy(t * mean).reshape(shape).float()


def _sce(us: list, select_topk: float, bend=None) -> torch.Tensor:
    """numpy float64: the top-variance positions (ties kept), a_k = mean(kept u_k^2) normalized
    (uniform below 1e-6), minority signs erased (``no_erase``: none; ``unmasked_weights``: a_k from
    the unselected u_k)."""
    shape = us[0].shape
    u = np.stack([x.double().numpy().ravel() for x in us])
    var = u.var(axis=0)
    kept = u
    if select_topk < 1:
        k = int(np.count_nonzero(var) * select_topk)
        keep = var >= np.sort(var)[::-1][k - 1] if k > 0 else np.zeros_like(var, dtype=bool)
        kept = u * keep
    means = ((u if bend == "unmasked_weights" else kept) ** 2).mean(axis=1)
    a = means / means.sum() if abs(means.sum()) >= 1e-6 else np.full(len(us), 1.0 / len(us))
    gamma = np.where(kept.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.ones_like(kept) if bend == "no_erase" else (np.sign(kept) == gamma).astype(float)
    num = (a[:, None] * agree * kept).sum(axis=0)
    den = np.maximum((a[:, None] * agree).sum(axis=0), 1e-6)
    return torch.from_numpy(num / den).reshape(shape).float()


def _share(t, a1, a2, bend=None):
    """The second expert's share of (1 - t) a1 and t a2 (``swapped_t``: the first's)."""
    total = (1 - t) * a1 + t * a2
    share = t if abs(total) < 1e-6 else t * a2 / total
    return 1 - share if bend == "swapped_t" else share


def _interpolate(ds: list, t0, a: list, method: str, t: float, flatten: bool, row_wise: bool, bend=None):
    """slerp of theta_0 + d_k (minus theta_0), or nuslerp of the d_k, in numpy float64."""
    if len(ds) == 1:
        return ds[0]
    shape = ds[0].shape
    if method == "slerp":
        x, y = ((t0.double() + d.double()).numpy().reshape(1, -1) for d in ds)
        share = _share(t, a[0], a[1], bend)
        nx, ny = (np.linalg.norm(v, axis=1, keepdims=True) for v in (x, y))
        nx, ny = np.where(nx > 1e-8, nx, 1.0), np.where(ny > 1e-8, ny, 1.0)
        cos = np.clip((x * y).sum(axis=1, keepdims=True) / (nx * ny), -1, 1)
        linear = (np.abs(cos) > 0.9995) | (bend == "lerp")
    else:
        total = a[0] + a[1]
        share = 0.5 if abs(total) < 1e-6 else a[1] / total
        share = 1 - share if bend == "swapped_t" else share
        x, y = (d.double().numpy() for d in ds)
        if flatten or x.ndim < 2:
            x, y = x.reshape(1, -1), y.reshape(1, -1)
        elif row_wise:
            x, y = x.reshape(x.shape[0], -1).T, y.reshape(y.shape[0], -1).T
        else:
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        nx, ny = (np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-7) for v in (x, y))
        cos = np.clip((x / nx * (y / ny)).sum(axis=1, keepdims=True), -1, 1)
        linear = ((1 - cos ** 2) <= 1e-16) | (bend == "lerp")
    angle = np.arccos(np.where(linear, 0.0, cos))
    with np.errstate(divide="ignore", invalid="ignore"):
        spherical = (np.sin((1 - share) * angle) * x + np.sin(share * angle) * y) / np.sin(angle)
    out = np.where(linear, (1 - share) * x + share * y, spherical)
    if method == "slerp":
        out = out - t0.double().numpy().reshape(1, -1)
    elif not (flatten or len(shape) < 2) and row_wise:
        out = out.T
    return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape).float()


def _baseline(method, n, lams, wts, pure, density, tall_lambda, agreeing, bend):
    """The delta of tensor n for soup, consensus and localize_stitch."""
    # the experts whose pure vector of n is not zero (all of them for soup's ``all_lambdas``)
    live = [e for e in lams if lams[e] * wts[e][n] != 0 or bend == "all_lambdas"]
    if not live:
        return torch.zeros(())
    if method == "soup":
        return _soup([pure[e][n] for e in live], [lams[e] for e in live], bend)
    if method == "consensus":  # every expert: a zero vector's mask must not change the merge
        return _consensus([lams[e] * pure[e][n] for e in lams], [pure[e][n] for e in lams], tall_lambda, agreeing,
                          bend)
    return _stitch([pure[e][n] for e in live], [lams[e] for e in live], density, bend)


def merge(dirs: dict, method="ta", weighting="uniform", lam=1.0, lams=None, density=0.2, topk_scope="tensor",
          p=0.9, seed=0, anchor="instruct", drop=0.5, threshold=0.95, normalize="none", rest_weight=None,
          explicit=None, target=None, gamma=0.01, epsilon=0.15, alpha=0.5, beta=0.5,
          of="linear_rank", k=2, tall_lambda=0.2, filter_wise=False, select_topk=1.0, t=0.5, nuslerp_flatten=True,
          nuslerp_row_wise=False, bend=None) -> dict[str, torch.Tensor]:
    """``target``: a checkpoint directory the delta is added to (default: theta_0);
    ``rest_weight`` None: 1, or alpha for LiNeS. ``ValueError`` for a method not in ``METHODS``
    or a ``bend`` not in ``BENDS[method]``."""
    if method not in METHODS:
        raise ValueError(f"tests/reference.py has no reference for merge method {method!r}; "
                         f"it has: {', '.join(METHODS)}")
    if bend is not None and bend not in BENDS.get(method, ()):
        raise ValueError(f"no bend {bend!r} for merge method {method!r}")
    agreeing = k  # consensus's count (the loops below name experts k)
    base, instruct = load(dirs["base"]), load(dirs["instruct"])
    experts = {k: load(v) for k, v in dirs["experts"].items()}
    L = 1 + max(layer_index(n) for n in base if layer_index(n) is not None)
    theta0 = instruct if anchor == "instruct" else base
    lams = {k: (lams or {}).get(k, lam) for k in experts}
    # pure vectors, float32
    if rest_weight is None:
        rest_weight = alpha if weighting == "lines" else 1.0
    pure, wts = {}, {}
    for e, ex in experts.items():
        w = weights(similarities(base, instruct, ex, L), weighting, drop, threshold, normalize, explicit, alpha, beta,
                    of, seed)
        wts[e] = {n: (rest_weight if layer_index(n) is None else w[layer_index(n)]) for n in theta0}
        pure[e] = {n: wts[e][n] * (ex[n].float() - theta0[n].float()) for n in theta0}
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
        live = [e for e in experts if lams[e] * wts[e][n] != 0]
        if method in ("sce", "slerp", "nuslerp") and not live:
            delta = 0.0
        elif method == "sce":
            delta = _sce([lams[e] * pure[e][n] for e in live], select_topk, bend)
        elif method in ("slerp", "nuslerp"):  # the layer weights set t; the d_k go in unscaled
            delta = _interpolate([experts[e][n].float() - theta0[n].float() for e in live], theta0[n].float(),
                                 [lams[e] * wts[e][n] for e in live], method, t, nuslerp_flatten, nuslerp_row_wise,
                                 bend)
        elif method in BENDS:
            delta = _baseline(method, n, lams, wts, pure, density, tall_lambda, agreeing, bend)
        elif method == "model_stock":  # over the experts whose vector is not zero by weight and lambda
            live = [e for e in experts if lams[e] * wts[e][n] != 0]
            delta = _model_stock([pure[e][n] for e in live], [lams[e] for e in live], filter_wise) if live else 0.0
        elif method == "ta":
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
