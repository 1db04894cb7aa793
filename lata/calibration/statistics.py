"""The statistics of an expert on its calibration examples, written as safetensors by tensor name.

- ``fisher``: the diagonal empirical Fisher, F = (1/N) sum_n (d log p(answer_n | prompt_n) / d theta)^2,
  one backward pass per example (per-example gradients: squaring a batch's summed gradient would
  be another quantity), log p the sum over the answer's tokens. A parameter tied to another (an
  lm_head sharing the embeddings) is one parameter, stored under the name the checkpoint holds.
- ``gram``: for every ``nn.Linear`` but the output head, G = sum over the examples' tokens of x x^T,
  x the layer's input (float32 on the device, accumulated in float64 on the CPU), stored under
  the layer's weight name.

The model runs in float32, in eval mode (no dropout), one example at a time, so no padding enters
a statistic. ``lata.run.caches.calibration_statistics`` keys and caches the files.

Memory: the float32 model must fit ``calibration.max_memory`` (default: 90% of what is free on
the device: a CUDA device's free memory, else the free RAM). The Gram pass streams a model that
does not: accelerate's dispatch keeps what fits on the device and brings the other blocks in,
one module at a time, from the CPU or from a folder on disk, during each forward pass (the
same operations in the same order: the same statistics). The Fisher pass needs the model and
its gradients (twice the weights) on the device and cannot stream them: a model that does not
fit is refused before any work, naming the bytes needed and free.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from lata.calibration import CalibrationExample
from lata.registry import ConfigError

log = logging.getLogger("lata")

#: the statistics a merge method may ask for (``MergeMethod.statistic``)
KINDS = ("fisher", "gram")
#: the file each statistic is written to in its cache directory
FILE = "statistics.safetensors"


def tokenized(tokenizer, example: CalibrationExample, max_length: int) -> tuple[torch.Tensor, int]:
    """(input ids [1, T], the number of leading prompt tokens) of one example, cut to max_length."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    ids = tokenizer(example.prompt + example.answer, add_special_tokens=False)["input_ids"][:max_length]
    return torch.tensor([ids]), min(len(prompt), len(ids))


def load_model(model_dir: str | Path, device: str, stream_dir: Path | None = None, budget: int | None = None):
    """(the float32 model in eval mode on ``device``, its tokenizer). With ``stream_dir`` and
    ``budget``: dispatched by accelerate, ``budget`` bytes of it on the device and the rest
    offloaded (the CPU's RAM beside a CUDA device, else ``stream_dir`` on disk), each module
    brought to the device for its forward pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if stream_dir is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    else:
        target = torch.device(device)
        key = (target.index or 0) if target.type == "cuda" else "cpu"
        memory = {key: budget} if target.type == "cpu" else {key: budget, "cpu": memory_budget("cpu")}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="auto",
                                                     max_memory=memory, offload_folder=str(stream_dir)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def input_device(model) -> torch.device:
    """Where a model's inputs go: its parameters' device, or for a dispatched model (``load_model``
    streaming) the CPU, from where accelerate's hooks move them to each module's device."""
    if getattr(model, "hf_device_map", None):
        return torch.device("cpu")
    return next(model.parameters()).device


def memory_budget(device: str) -> int:
    """90% of the bytes free on ``device`` (``lata.accel.compute.free_memory``)."""
    from lata.accel.compute import free_memory

    return int(0.9 * free_memory(device))


def weight_bytes(model_dir: str | Path) -> int:
    """The bytes of the checkpoint's parameters in float32 (counted on the meta device: nothing loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return 4 * sum(p.numel() for p in model.parameters())


def fisher(model, tokenizer, examples: list[CalibrationExample], max_length: int,
           progress: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of ``model`` on ``examples`` (float32, CPU)."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    scored = 0
    for example in examples:
        ids, start = tokenized(tokenizer, example, max_length)
        ids = ids.to(input_device(model))
        if ids.shape[1] - max(start, 1) < 1:
            progress()
            continue  # no answer token left after the cut: nothing to score
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        logp[max(start, 1) - 1:].sum().backward()
        for name, p in params.items():
            if p.grad is not None:
                total[name].add_(p.grad.detach().float().cpu().square())
        scored += 1
        progress()
    if scored == 0:
        raise ConfigError("calibration: no example has an answer token within calibration.max_length")
    return {name: t.div_(scored) for name, t in total.items()}


def grams(model, tokenizer, examples: list[CalibrationExample], max_length: int,
          progress: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """sum x x^T of every linear layer's inputs but the output head's (float32, CPU)."""
    head = model.get_output_embeddings()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            g = (x.T @ x).double().cpu()
            sums[name] = g if name not in sums else sums[name].add_(g)
        return record

    handles = [module.register_forward_hook(hook(f"{name}.weight")) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head]
    try:
        with torch.no_grad():
            for example in examples:
                ids, _ = tokenized(tokenizer, example, max_length)
                model(input_ids=ids.to(input_device(model)))
                progress()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums.pop(name).float() for name in list(sums)}  # each float64 sum freed as it is converted


def compute(kind: str, model_dir: str | Path, examples: list[CalibrationExample], max_length: int,
            out: Path, device: str = "cpu", progress: bool = True, label: str = "",
            max_memory: int | None = None) -> None:
    """Write ``kind``'s statistics of the checkpoint at ``model_dir`` to ``out/FILE``.
    ``max_memory``: the bytes the model may take on the device (None: ``memory_budget``)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise ValueError(f"unknown statistic {kind!r}; one of {KINDS}")
    budget = memory_budget(device) if max_memory is None else int(max_memory)
    weights = weight_bytes(model_dir)
    stream = None
    if kind == "fisher" and 2 * weights > budget:
        raise ConfigError(f"calibration: the Fisher pass of {label or model_dir} holds the float32 model and its "
                          f"gradients on {device}: {2 * weights / 2**30:.2f} GiB, more than the "
                          f"{budget / 2**30:.2f} GiB it may use (calibration.max_memory); it cannot stream them: "
                          f"use a device with more memory")
    if weights > budget:
        stream = out / "offload"
        log.info("calibration: %s (%.2f GiB in float32) does not fit the %.2f GiB it may use on %s: streamed "
                 "module by module", label or model_dir, weights / 2**30, budget / 2**30, device)
    model, tokenizer = load_model(model_dir, device, stream, budget)
    bar = tqdm(total=len(examples), desc=f"calibration: {kind} of {label or model_dir}", disable=not progress,
               leave=False)
    try:
        stats = (fisher if kind == "fisher" else grams)(model, tokenizer, examples, max_length, lambda: bar.update())
    finally:
        bar.close()
    save_file({k: v.contiguous() for k, v in stats.items()}, str(out / FILE))
    if stream is not None:
        del model
        shutil.rmtree(stream, ignore_errors=True)


class Statistics:
    """One expert's statistics file, read per tensor (float32 on the CPU; None where absent)."""

    def __init__(self, path: str | Path, kind: str):
        from safetensors import safe_open

        self.path, self.kind = Path(path), kind
        self._file = safe_open(str(self.path), framework="pt")
        self.names = set(self._file.keys())

    def get(self, name: str) -> torch.Tensor | None:
        return self._file.get_tensor(name).float() if name in self.names else None
