"""Pass 1: per-layer similarity of each expert's complex vector to the instruction vector.

s_{l,k} = cos(tau_comp_k[l], tau_instr[l]) with tau_comp_k = theta_k - theta_base and
tau_instr = theta_inst - theta_base, from sums over the block's tensors of per-tensor dot
products and squared norms (never a concatenated layer vector). The products are computed in
float32 over fixed slices of 2^18 elements of each tensor; the sums over slices and tensors are
accumulated in float64. This pass also reads every input tensor once and refuses NaN/Inf
before anything is written: a tensor is checked element by element only when a cheap test
fails (a sum, or a squared norm already computed, is finite only if every term is).

Reading is streamed as in the merge (``lata.engine``): zero-copy views of the memory maps, a
read-ahead thread, and each tensor's pages released from the process once used.

On an accelerator (``staged``, ``lata.accel.transfer``) each tensor arrives whole on the device and
its sums are taken there at once: the float32 differences as above, their products and sums in
float64 (exact products, sums good to about 1e-16 relative, one matrix product per 2^24
values). Decision: these sums are the more exact ones, so the similarities of the staged path
may differ from the CPU's float32 slices in the last digits (~1e-7 relative); the weights
differ only where a similarity lies that close to a threshold or a tie.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from lata.accel import kernels
from lata.io.prefetch import Prefetcher
from lata.accel.compute import (SliceWorkers, as_float32, check_device, finite_sum, pure_slice, thread_buffer,
                                torch_threads, tune_malloc)
from lata.family import Family

BLOCK = 1 << 18  # elements per float32 partial dot product (fixed: results never depend on settings)


@dataclass
class LayerAnalysis:
    experts: list[str]
    num_layers: int
    dot: dict[str, list[float]] = field(default_factory=dict)  # <tau_comp_k[l], tau_instr[l]>
    comp_sq: dict[str, list[float]] = field(default_factory=dict)  # ||tau_comp_k[l]||^2
    instr_sq: list[float] = field(default_factory=list)  # ||tau_instr[l]||^2

    @property
    def similarities(self) -> dict[str, list[float]]:
        """s_{l,k}; 0 where either norm is 0."""
        return {
            k: [
                self.dot[k][l] / math.sqrt(self.comp_sq[k][l] * self.instr_sq[l])
                if self.comp_sq[k][l] > 0 and self.instr_sq[l] > 0 else 0.0
                for l in range(self.num_layers)
            ]
            for k in self.experts
        }

    def degeneracies(self) -> list[str]:
        """What makes the similarities say nothing about the layers, one sentence each: a zero
        instruction vector (base = instruct), an expert equal to the instruct model (task vector
        zero, similarity 1 everywhere) or to the base (similarity 0 everywhere), or similarities
        equal in every layer. Any weighting of such a family is decided by its tie rule alone."""
        out = []
        tie = "its layer weights are decided by the weighting's tie rule alone"
        if all(v == 0 for v in self.instr_sq):
            out.append(f"base and instruct are equal in every block (the instruction vector is zero): every "
                       f"similarity is 0, and {tie}")
        sims = self.similarities
        for k in self.experts:
            if all(v == 0 for v in self.instr_sq):
                continue
            if all(v == 0 for v in self.comp_sq[k]):
                out.append(f"expert '{k}' equals the base model in every block (similarity 0 everywhere): {tie}")
            elif all(math.isclose(d, c, rel_tol=1e-9, abs_tol=0) and math.isclose(d, i, rel_tol=1e-9, abs_tol=0)
                     for d, c, i in zip(self.dot[k], self.comp_sq[k], self.instr_sq)):
                out.append(f"expert '{k}' equals the instruct model in every block (its task vector is zero, "
                           f"similarity 1 everywhere): {tie}")
            elif self.num_layers > 1 and max(sims[k]) - min(sims[k]) <= 1e-12:
                out.append(f"expert '{k}' has the same similarity in every layer ({sims[k][0]:.6g}): {tie}")
        return out

    def table(self, weights: dict[str, list[float]] | None = None) -> list[dict]:
        """One row per (expert, layer): similarity, norms and (if given) the layer weight."""
        sims = self.similarities
        rows = []
        for k in self.experts:
            for l in range(self.num_layers):
                row = {"expert": k, "layer": l, "similarity": sims[k][l],
                       "comp_norm": math.sqrt(self.comp_sq[k][l]), "instr_norm": math.sqrt(self.instr_sq[l])}
                if weights is not None:
                    row["weight"] = weights[k][l]
                rows.append(row)
        return rows

    def to_csv(self, weights: dict[str, list[float]] | None = None) -> str:
        rows = self.table(weights)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def to_dict(self, weights: dict[str, list[float]] | None = None) -> dict:
        data = {"experts": self.experts, "num_layers": self.num_layers, "similarities": self.similarities}
        if weights is not None:
            data["weights"] = weights
        return data


def layer_similarities(family: Family, device: str = "cpu", progress: bool = True,
                      prefetch: bool = True, threads: int | None = None, staged: bool | None = None) -> LayerAnalysis:
    """Stream every tensor of the family once and accumulate the per-layer sums.

    ``prefetch``: a read-ahead thread; ``threads``: slice workers (None: ``auto_threads()``). Neither
    changes the result. ``staged``: whole tensors loaded onto the device (None: on an
    accelerator only; see the module's docstring).
    """
    check_device(device)
    if torch.device(device).type != "cpu" if staged is None else staged:
        return _staged_similarities(family, device, progress, threads)
    fused = kernels.worthwhile(family.nbytes, device)
    if fused:
        kernels.preload()
    result = _new_analysis(family)
    tune_malloc()
    ckpts = family.checkpoints  # base, instruct, experts (in order)
    names = family.tensor_names
    with Prefetcher([[(c, n) for c in ckpts] for n in names], enabled=prefetch) as prefetcher, \
            SliceWorkers(threads, device=device) as workers, torch_threads(1, device):
        for i, name in enumerate(tqdm(names, desc="layer similarities", disable=not progress, leave=False)):
            prefetcher.advance(i)
            views = _shared_rows(family, name, ckpts, [c.get(name) for c in ckpts])
            layer = family.layer_of(name)
            try:
                if not views[0].is_floating_point():
                    continue
                # the squared norms are finite only if every value of every model is: non-layer
                # tensors (embeddings, final norm) go through the same parallel pass for the check
                gram = _gram(views, device, workers, fused)  # rows: tau_instr, tau_comp_1..K
                if not all(math.isfinite(gram[j][j]) for j in range(len(gram))):
                    for ckpt, view in zip(ckpts, views):
                        ckpt.refuse_non_finite(name, view)  # names the first culprit
                if layer is not None:
                    _add(result, layer, gram)
            finally:
                for ckpt in ckpts:
                    ckpt.release([name])
    return result


def _shared_rows(family: Family, name: str, ckpts: list, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A vocabulary tensor's rows every checkpoint shares (the sums are over those), each
    checkpoint's other rows checked to be finite here; other tensors as they are."""
    if name not in family.vocab_tensors:
        return tensors
    rows = family.shared_rows
    for ckpt, tensor in zip(ckpts, tensors):
        if tensor.shape[0] > rows and not finite_sum(tensor[rows:].reshape(-1)):
            ckpt.refuse_non_finite(name, tensor)
    return [t[:rows] for t in tensors]


def _new_analysis(family: Family) -> LayerAnalysis:
    L, experts = family.num_layers, family.expert_names
    return LayerAnalysis(experts=experts, num_layers=L, dot={k: [0.0] * L for k in experts},
                         comp_sq={k: [0.0] * L for k in experts}, instr_sq=[0.0] * L)


def _add(result: LayerAnalysis, layer: int, gram: list[list[float]]) -> None:
    result.instr_sq[layer] += gram[0][0]
    for j, k in enumerate(result.experts, start=1):
        result.dot[k][layer] += gram[j][0]
        result.comp_sq[k][layer] += gram[j][j]


#: values per float64 matrix product of the staged pass (bounds its temporaries)
STAGED_STEP = 1 << 24


def _staged_similarities(family: Family, device: str, progress: bool, threads: int | None) -> LayerAnalysis:
    """``layer_similarities`` on the staged path (``lata.accel.transfer``)."""
    from lata.accel.transfer import DeviceLoader

    result = _new_analysis(family)
    ckpts = family.checkpoints
    names = family.tensor_names
    schedule = [[(c, n) for c in ckpts] if ckpts[0].is_float(n) else [] for n in names]
    with DeviceLoader(schedule, device, threads=threads) as loader, torch_threads(1):
        for i, name in enumerate(tqdm(names, desc="layer similarities", disable=not progress, leave=False)):
            tensors = loader.take(i)
            if not tensors or not tensors[0].is_floating_point():
                continue
            tensors = _shared_rows(family, name, ckpts, tensors)
            gram = _gram_float64(tensors)
            if not all(math.isfinite(gram[j][j]) for j in range(len(gram))):
                for ckpt, tensor in zip(ckpts, tensors):
                    ckpt.refuse_non_finite(name, tensor)
            layer = family.layer_of(name)
            if layer is not None:
                _add(result, layer, gram)
    return result


def _gram_float64(tensors: list[torch.Tensor]) -> list[list[float]]:
    """``_gram``'s sums from whole tensors on one device: float32 differences to the base,
    products and sums in float64."""
    flat = [t.reshape(-1) for t in tensors]
    n, rows = flat[0].numel(), len(flat) - 1
    sums = torch.zeros((rows, rows), dtype=torch.float64, device=flat[0].device)
    for start in range(0, n, STAGED_STEP):
        base = flat[0][start:start + STAGED_STEP].float()
        x = torch.stack([(t[start:start + STAGED_STEP].float() - base).double() for t in flat[1:]])
        sums += x @ x.T
    values = sums.tolist()
    gram = [[0.0] * rows for _ in range(rows)]
    gram[0][0] = values[0][0]
    for j in range(1, rows):
        gram[j][0], gram[j][j] = values[j][0], values[j][j]
    return gram


def _gram(views: list[torch.Tensor], device: str, workers: SliceWorkers | None = None,
          fused: bool = False) -> list[list[float]]:
    """Dot products of tau_instr and each tau_comp_k (rows minus the base), summed over slices.

    Returns G with G[0][0] = ||tau_instr||^2, G[j][0] = <tau_comp_j, tau_instr> and
    G[j][j] = ||tau_comp_j||^2 (j >= 1); other entries are 0. Each slice of BLOCK elements gives
    float32 dot products; they are added up in float64, in slice order. ``fused``: by the numba
    kernel where it supports the dtypes and device (``lata.accel.kernels.gram``, the more exact sums).
    """
    flat = [v.reshape(-1) for v in views]
    base, rest = flat[0], flat[1:]
    n, rows = base.numel(), len(rest)
    fused = fused and kernels.supports([v.dtype for v in flat], None, device) and all(v.is_contiguous() for v in flat)

    def block(start: int, stop: int) -> torch.Tensor:
        buffer = thread_buffer("gram", rows + 1, BLOCK, device)[:, : stop - start]
        x = buffer[:rows]
        b = as_float32(base[start:stop], buffer[rows], device)
        for j, v in enumerate(rest):
            pure_slice(v[start:stop], b, 1.0, device, x[j])
        parts = [torch.dot(x[0], x[0])]
        for j in range(1, rows):
            parts += [torch.dot(x[j], x[0]), torch.dot(x[j], x[j])]
        return torch.stack(parts).double()

    workers = workers or SliceWorkers(1)
    if fused:
        # the same sums, laid out alike (float64 numpy), one per BLOCK: a worker's slice holds
        # whole BLOCKs (about kernels.SLICE values), so the sums never depend on the slicing
        over = kernels.gram(flat)

        def blocks(start: int, stop: int) -> list[np.ndarray]:
            return [over(a, min(a + BLOCK, stop)) for a in range(start, stop, BLOCK)]

        per_slice = workers.map(blocks, n, max(1, kernels.SLICE // BLOCK) * BLOCK)
        partials = [part for parts in per_slice for part in parts]
    else:
        partials = workers.map(block, n, BLOCK)
    sums = partials[0]
    for part in partials[1:]:
        sums = sums + part
    values = sums.tolist()
    gram = [[0.0] * rows for _ in range(rows)]
    gram[0][0] = values[0]
    for j in range(1, rows):
        gram[j][0], gram[j][j] = values[2 * j - 1], values[2 * j]
    return gram
