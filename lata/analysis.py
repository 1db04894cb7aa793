"""Pass 1: per-layer similarity of each expert's complex vector to the instruction vector.

s_{l,k} = cos(tau_comp_k[l], tau_instr[l]) with tau_comp_k = theta_k - theta_base and
tau_instr = theta_inst - theta_base, from sums over the block's tensors of per-tensor dot
products and squared norms (never a concatenated layer vector). Each tensor's products are
computed in float32; the sums over tensors are accumulated in float64. This pass also reads
every input tensor once and refuses NaN/Inf before anything is written.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lata.family import Family


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


def layer_similarities(family: Family, device: str = "cpu", progress: bool = True) -> LayerAnalysis:
    """Stream every tensor of the family once and accumulate the per-layer sums."""
    L, experts = family.num_layers, family.expert_names
    result = LayerAnalysis(
        experts=experts, num_layers=L,
        dot={k: [0.0] * L for k in experts}, comp_sq={k: [0.0] * L for k in experts}, instr_sq=[0.0] * L,
    )
    for name in tqdm(family.tensor_names, desc="layer similarities", disable=not progress, leave=False):
        base = family.base.get(name, check_finite=True)
        instruct = family.instruct.get(name, check_finite=True)
        layer = family.layer_of(name)
        if layer is None or not base.is_floating_point():
            for ckpt in family.experts.values():
                ckpt.get(name, check_finite=True)
            continue
        base = base.to(device, torch.float32).flatten()
        tau_instr = instruct.to(device, torch.float32).flatten() - base
        result.instr_sq[layer] += float(torch.dot(tau_instr, tau_instr))
        for k, ckpt in family.experts.items():
            tau_comp = ckpt.get(name, check_finite=True).to(device, torch.float32).flatten() - base
            result.dot[k][layer] += float(torch.dot(tau_comp, tau_instr))
            result.comp_sq[k][layer] += float(torch.dot(tau_comp, tau_comp))
    return result
