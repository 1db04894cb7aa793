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
same operations in the same order: the same statistics). The Fisher pass holds the model and its
gradients (twice the weights) on the device; where they do not fit it runs ``fisher_by_block``:
the model in the CPU's RAM, on the device the parts outside the decoder layers and one layer at a
time, with their gradients. Where even that does not fit, it is refused before any work, naming
the bytes needed and free.
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


def _meta_model(model_dir: str | Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def weight_bytes(model_dir: str | Path) -> int:
    """The bytes of the checkpoint's parameters in float32 (counted on the meta device: nothing loaded)."""
    return 4 * sum(p.numel() for p in _meta_model(model_dir).parameters())


def block_bytes(model_dir: str | Path) -> int:
    """The float32 bytes ``fisher_by_block`` holds on its device besides activations: the parts
    outside the decoder layers and the largest layer, each with its gradients."""
    model = _meta_model(model_dir)
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    inside = {id(p) for p in layers.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return 2 * 4 * (outside + largest)


def fisher(model, tokenizer, examples: list[CalibrationExample], max_length: int,
           progress: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of ``model`` on ``examples`` (float32, CPU)."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p, device="cpu") for name, p in params.items()}
    kept = _scorable(tokenizer, examples, max_length, progress)
    for ids, start in kept:
        ids = ids.to(input_device(model))
        model.zero_grad(set_to_none=True)
        _answer_logp(model(input_ids=ids).logits, ids, start).backward()
        for name, p in params.items():
            if p.grad is not None:
                total[name].add_(p.grad.detach().float().cpu().square())
        progress()
    return {name: t.div_(len(kept)) for name, t in total.items()}


def _answer_logp(logits: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """log p(answer | prompt): the log-probabilities of the tokens after the prompt, summed."""
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[max(start, 1) - 1:].sum()


def _scorable(tokenizer, examples: list[CalibrationExample], max_length: int,
              progress: Callable[[], None]) -> list[tuple[torch.Tensor, int]]:
    """(ids, prompt length) of the examples with an answer token within ``max_length``;
    ``progress`` is called once per example left out (nothing to score after the cut)."""
    kept = [tokenized(tokenizer, e, max_length) for e in examples]
    kept = [(ids, start) for ids, start in kept if ids.shape[1] - max(start, 1) >= 1]
    if not kept:
        raise ConfigError("calibration: no example has an answer token within calibration.max_length")
    for _ in range(len(examples) - len(kept)):
        progress()
    return kept


def decoder_layers(model) -> tuple[torch.nn.Module, str]:
    """(the module holding the model's list of decoder layers, that list's attribute name): the
    ``nn.ModuleList`` with ``config.num_hidden_layers`` entries."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        for attr, child in module.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                return module, attr
    raise ConfigError(f"calibration: no list of {n} decoder layers found in {type(model).__name__}")


class _StandIns:
    """Every decoder layer's forward replaced while inside: it returns its hidden states unchanged
    and records its call (the other arguments); the last layer returns ``last`` where given. The
    model's own code runs around them: embeddings, masks, position embeddings, final norm, head."""

    def __init__(self, layers: torch.nn.ModuleList, last: torch.Tensor | None = None):
        self.layers, self.last = layers, last
        self.calls: list[tuple[bool, tuple, dict]] = []  # (hidden positional, other args, kwargs)
        self.first: torch.Tensor | None = None  # the first layer's input

    def _forward(self, index: int):
        def forward(*args, **kwargs):
            positional = bool(args)
            hidden = args[0] if positional else kwargs.pop("hidden_states")
            if index == 0:
                self.first = hidden
            self.calls.append((positional, args[1:], kwargs))
            return self.last if self.last is not None and index == len(self.layers) - 1 else hidden
        return forward

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            layer.forward = self._forward(index)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward  # the class's forward again


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor, call: tuple[bool, tuple, dict]) -> torch.Tensor:
    positional, args, kwargs = call
    out = layer(hidden, *args, **kwargs) if positional else layer(*args, hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def fisher_by_block(model, tokenizer, examples: list[CalibrationExample], max_length: int, device: str,
                    progress: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
    """``fisher`` with ``model`` on the CPU and, on ``device``, the parts outside the decoder layers
    and one layer at a time, with its gradients. ``progress`` is called once per example and twice
    per layer; the model's parts outside the layers are left on ``device``.

    Per-block recomputation: a forward pass layer by layer over every example keeps each layer's
    input (on the CPU); then from the last layer down each layer comes to the device once and, per
    example, runs again on its kept input and takes the gradient of its output back to its
    parameters (squared and summed there) and to its input (kept for the layer below). The parts
    outside the layers (embeddings, final norm, head: the model's own code, with the layers stood
    in for) run per example, at the start for the gradient of the last layer's output and at the
    end for their own parameters' gradient, both paths of a tied embedding summed before squaring.
    The same quantity as ``fisher``; the sums differ in order only.
    """
    examples_ids = _scorable(tokenizer, examples, max_length, progress)
    target = torch.device(device)
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList())
    model.to(target)  # everything but the layers
    setattr(parent, attr, layers)
    names = {id(p): n for n, p in model.named_parameters()}
    in_layers = {id(p) for p in layers.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_layers]
    total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in model.named_parameters()}
    ids_on = [ids.to(target) for ids, _ in examples_ids]

    calls, hidden = [], []  # per example: each layer's call; the current layer's input (CPU)
    with torch.no_grad():
        for ids in ids_on:
            with _StandIns(layers) as stand_ins:
                model(input_ids=ids, use_cache=False)
            calls.append(stand_ins.calls)
            hidden.append(stand_ins.first.cpu())
        inputs = []  # inputs[l][i]: layer l's input for example i
        for index, layer in enumerate(layers):
            inputs.append(hidden)
            layer.to(target)
            hidden = [_run_layer(layer, h.to(target), c[index]).cpu() for h, c in zip(hidden, calls)]
            layer.to("cpu")
            progress()

    def outside_pass(i: int, last: torch.Tensor):
        stand_ins = _StandIns(layers, last)
        with stand_ins:
            logp = _answer_logp(model(input_ids=ids_on[i], use_cache=False).logits, ids_on[i], examples_ids[i][1])
        return logp, stand_ins.first

    grads = []  # the gradient at the current layer's output, per example (CPU)
    for i, out in enumerate(hidden):
        last = out.to(target).requires_grad_()
        logp, _ = outside_pass(i, last)
        grads.append(torch.autograd.grad(logp, last)[0].cpu())
    for index in reversed(range(len(layers))):
        layer = layers[index].to(target)
        params = list(layer.parameters())
        sums = [torch.zeros_like(p) for p in params]
        for i, call in enumerate(calls):
            x = inputs[index][i].to(target).requires_grad_()
            out = _run_layer(layer, x, call[index])
            got = torch.autograd.grad(out, [x, *params], grad_outputs=grads[i].to(target), allow_unused=True)
            grads[i] = got[0].cpu()
            for s, g in zip(sums, got[1:]):
                if g is not None:
                    s.add_(g.float().square())
        for p, s in zip(params, sums):
            total[names[id(p)]].add_(s.cpu())
        layer.to("cpu")
        inputs[index] = None
        progress()
    for i, out in enumerate(hidden):
        last = out.to(target).requires_grad_()
        logp, first = outside_pass(i, last)
        got = torch.autograd.grad([logp, first], outside, grad_outputs=[torch.ones_like(logp), grads[i].to(target)],
                                  allow_unused=True)
        for p, g in zip(outside, got):
            if g is not None:
                total[names[id(p)]].add_(g.float().square().cpu())
        progress()
    return {name: t.div_(len(examples_ids)) for name, t in total.items()}


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
    name, gib = label or model_dir, lambda n: f"{n / 2**30:.2f} GiB"
    stream, by_block = None, kind == "fisher" and 2 * weights > budget
    if by_block:
        on_cpu = torch.device(device).type == "cpu"
        need = block_bytes(model_dir) + (weights if on_cpu else 0)
        ram = budget if on_cpu else memory_budget("cpu")
        if need > budget or weights > ram:
            raise ConfigError(
                f"calibration: the Fisher pass of {name} needs, block by block, {gib(need)} on {device} (the parts "
                f"outside the decoder layers and the largest layer, with their gradients"
                f"{', and the float32 model' if on_cpu else ''}), and the float32 model ({gib(weights)}) in RAM: "
                f"{device} may use {gib(budget)} (calibration.max_memory){'' if on_cpu else ', RAM ' + gib(ram)}; "
                f"use a device with more memory")
        log.info("calibration: the Fisher pass of %s (%s in float32, twice that with its gradients) does not fit "
                 "the %s it may use on %s: computed block by block", name, gib(weights), gib(budget), device)
    elif weights > budget:
        stream = out / "offload"
        log.info("calibration: %s (%s in float32) does not fit the %s it may use on %s: streamed module by module",
                 name, gib(weights), gib(budget), device)
    model, tokenizer = load_model(model_dir, "cpu" if by_block else device, stream, budget)
    steps = len(examples) + (2 * model.config.num_hidden_layers if by_block else 0)
    bar = tqdm(total=steps, desc=f"calibration: {kind} of {name}", disable=not progress, leave=False)
    try:
        if by_block:
            stats = fisher_by_block(model, tokenizer, examples, max_length, device, lambda: bar.update())
        else:
            stats = (fisher if kind == "fisher" else grams)(model, tokenizer, examples, max_length,
                                                            lambda: bar.update())
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
