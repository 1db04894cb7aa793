"""Layer weights learned from data (layer-wise AdaMerging, Yang et al., ICLR 2024), the upper
bound a similarity-driven weighting can be measured against.

The merged model theta(w) = theta_0 + sum_k lambda_k w_{l,k} d_k (d_k = theta_k - theta_0; block l's
weight for its tensors, ``rest_weight`` fixed for the tensors outside the blocks) runs through
``torch.func.functional_call`` on the anchor's module: the d_k and theta_0 are held once, the
model is never copied, and gradients reach w only. Adam minimises, over every expert's
calibration examples:
- ``entropy``: the mean entropy of the next-token distribution over the prompts' positions (the
  tasks' inputs without their answers: no labels), AdaMerging's objective;
- ``likelihood``: the mean negative log-likelihood of the answers' tokens given their prompts
  (labels: an upper bound not limited by the entropy proxy).
After each step w is clamped to [low, high]. The model runs in its loaded dtype (float32 from a
run) on ``device``.

Memory: theta_0 and K task vectors in float32 (K + 1 copies of the model) and the activations
of one micro-batch (``BATCH_TOKENS`` padded tokens): meant for models that fit that many times on
the device.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from lata.calibration import CalibrationExample
from lata.calibration.statistics import tokenized
from lata.registry import ConfigError
from lata.weightings.learned import OBJECTIVES

log = logging.getLogger("lata")


class MergedModel:
    """theta(w) over a loaded anchor module: per parameter theta_0, the d_k and its block."""

    def __init__(self, model, family, lams: Sequence[float], rest_weight: float):
        self.model = model
        self.lams, self.rest = [float(x) for x in lams], float(rest_weight)
        device = next(model.parameters()).device
        names = set(family.tensor_names)
        self.theta0, self.vectors, self.blocks = {}, {}, {}
        for name, p in model.named_parameters():
            if name not in names:
                raise ConfigError(f"weighting=learned: the model's parameter '{name}' is not a tensor of the "
                                  f"checkpoints (renamed on load?)")
            base = p.detach()
            self.theta0[name] = base
            self.vectors[name] = [family.experts[k].get(name).to(device, base.dtype) - base
                                  for k in family.expert_names]
            self.blocks[name] = family.layer_of(name)
        for p in model.parameters():
            p.requires_grad_(False)

    def parameters(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta(w) for every parameter (w: [K, L])."""
        out = {}
        for name, base in self.theta0.items():
            block = self.blocks[name]
            total = base
            for k, (d, lam) in enumerate(zip(self.vectors[name], self.lams)):
                scale = lam * (w[k, block] if block is not None else self.rest)
                total = total + scale * d
            out[name] = total
        return out


#: padded tokens per forward pass: examples run in micro-batches of about this many tokens
BATCH_TOKENS = 4096


def micro_batches(batch: list[tuple[torch.Tensor, int]], budget: int = BATCH_TOKENS) -> list[list[tuple[torch.Tensor, int]]]:
    """``batch`` in order, cut into runs whose padded size (count x longest) stays within
    ``budget`` tokens (one example at least)."""
    out: list[list[tuple[torch.Tensor, int]]] = []
    current: list[tuple[torch.Tensor, int]] = []
    longest = 0
    for item in batch:
        longest_next = max(longest, item[0].shape[1])
        if current and longest_next * (len(current) + 1) > budget:
            out.append(current)
            current, longest_next = [], item[0].shape[1]
        current.append(item)
        longest = longest_next
    if current:
        out.append(current)
    return out


def objective_sum(merged: MergedModel, params: dict[str, torch.Tensor], chunk: list[tuple[torch.Tensor, int]],
                  objective: str) -> tuple[torch.Tensor, int]:
    """(the objective summed over ``chunk``'s scored positions, their count): one forward pass of
    the examples right-padded to the longest (causal attention: a position never sees the pads
    after it, so no mask is needed and each example's logits are its own)."""
    from torch.func import functional_call

    width = max(ids.shape[1] for ids, _ in chunk)
    padded = torch.zeros((len(chunk), width), dtype=chunk[0][0].dtype, device=chunk[0][0].device)
    for i, (ids, _) in enumerate(chunk):
        padded[i, : ids.shape[1]] = ids[0]
    logits = functional_call(merged.model, params, (), {"input_ids": padded}).logits
    total, count = 0.0, 0
    for i, (ids, start) in enumerate(chunk):
        logp = torch.log_softmax(logits[i, : ids.shape[1] - 1], dim=-1)
        if objective == "entropy":
            span = logp[: max(start, 1)]  # predictions at the prompt's positions (no answer seen)
            total = total - (span.exp() * span).sum()
        else:
            first = max(start, 1) - 1
            targets = ids[0, first + 1:]
            total = total - logp[first:].gather(1, targets[:, None]).sum()
        count += scored_positions(ids.shape[1], start, objective)
    return total, count


def scored_positions(length: int, start: int, objective: str) -> int:
    """How many positions of an example of ``length`` tokens, ``start`` of them the prompt's,
    the objective scores: entropy the prompt's predictions, likelihood the answer's tokens."""
    if objective == "entropy":
        return min(max(start, 1), length - 1)
    return max(length - max(start, 1), 0)


def objective_value(merged: MergedModel, w: torch.Tensor, batch: list[tuple[torch.Tensor, int]],
                    objective: str) -> torch.Tensor:
    """The objective at w over tokenized examples [(ids [1, T], prompt tokens)]: the mean over
    every scored position of every example."""
    params = merged.parameters(w)
    total, count = 0.0, 0
    for chunk in micro_batches(batch):
        part, n = objective_sum(merged, params, chunk, objective)
        total, count = total + part, count + n
    return total / max(count, 1)


def learn_weights(model, tokenizer, family, lams: Sequence[float], rest_weight: float,
                  examples: dict[str, list[CalibrationExample]], *, objective: str = "entropy", steps: int = 50,
                  lr: float = 0.01, init: float = 1.0, low: float = 0.0, high: float = 2.0, max_length: int = 256,
                  progress: Callable[[int, float], None] = lambda step, loss: None) -> dict[str, list[float]]:
    """{expert: its L learned block weights}: Adam on w from ``init`` over every expert's examples.
    ``model``: the anchor's module (float32, on the device it runs on)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"weighting.objective={objective!r} is not allowed; choose one of: {', '.join(OBJECTIVES)}")
    device = next(model.parameters()).device
    merged = MergedModel(model, family, lams, rest_weight)
    batch = []
    for expert in family.expert_names:
        for example in examples[expert]:
            ids, start = tokenized(tokenizer, example, max_length)
            if ids.shape[1] >= 2:
                batch.append((ids.to(device), start))
    if not batch:
        raise ConfigError("weighting=learned: no calibration example has two tokens or more")
    scored = max(sum(scored_positions(ids.shape[1], start, objective) for ids, start in batch), 1)
    w = torch.full((len(family.expert_names), family.num_layers), float(init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=lr)
    chunks = micro_batches(batch)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        # the mean's gradient accumulated micro-batch by micro-batch: one micro-batch's activations
        # in memory at a time (theta(w) rebuilt for each, its graph freed by its backward pass)
        loss = 0.0
        for chunk in chunks:
            part, _ = objective_sum(merged, merged.parameters(w), chunk, objective)
            (part / scored).backward()
            loss += float(part.detach()) / scored
        optimizer.step()
        with torch.no_grad():
            w.clamp_(low, high)
        progress(step, loss)
    return {k: [float(x) for x in w[i].detach().cpu()] for i, k in enumerate(family.expert_names)}
