"""Tiny checkpoint families of many architectures, built with transformers' own classes.

Each family: base (random init), instruct = base + noise, two experts = instruct + noise that
grows with depth, all written by ``save_pretrained``. Where each architecture keeps its blocks
and which tensors it ties is written out here (``Expected``), independently of LATA's inference,
so that the tests can check the inference against it and the reference can place tensors by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

#: the size every family shares (types that name a setting otherwise say so in ``FAMILIES``)
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=256, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYERS = COMMON["num_hidden_layers"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
MODEL = "model.layers.{l}."
TIED = ("lm_head.weight", "model.embed_tokens.weight")
#: the block index of a parameter as the modules name it, for the depth of the experts' noise
DEPTH = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


@dataclass(frozen=True)
class Expected:
    """What a family's checkpoints are: the block prefix and the tied pair (output, input)."""
    prefix: str
    tied: tuple[str, str]
    #: config.json ties the embeddings
    ties: bool

    @property
    def layer_regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.prefix).replace(r"\{l\}", r"(\d+)"))


#: model_type -> (config settings beyond COMMON, what the checkpoints are)
FAMILIES: dict[str, tuple[dict, Expected]] = {
    "llama": (dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE), Expected(MODEL, TIED, True)),
    "mistral": ({}, Expected(MODEL, TIED, False)),
    "qwen2": ({}, Expected(MODEL, TIED, False)),
    "qwen3": (dict(head_dim=16), Expected(MODEL, TIED, False)),
    "qwen3_moe": (dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                  Expected(MODEL, TIED, False)),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), Expected(MODEL, TIED, False)),
    "gemma": (dict(head_dim=16), Expected(MODEL, TIED, True)),
    "gemma2": (dict(head_dim=16), Expected(MODEL, TIED, True)),
    "gemma3_text": (dict(head_dim=16), Expected(MODEL, TIED, True)),
    "phi3": ({}, Expected(MODEL, TIED, False)),
    "olmo2": ({}, Expected(MODEL, TIED, False)),
    "granite": ({}, Expected(MODEL, TIED, False)),
    "starcoder2": ({}, Expected(MODEL, TIED, True)),
    "gpt_neox": ({}, Expected("gpt_neox.layers.{l}.", ("embed_out.weight", "gpt_neox.embed_in.weight"), False)),
    "phi": ({}, Expected(MODEL, TIED, False)),
    "cohere": ({}, Expected(MODEL, TIED, True)),
    "smollm3": ({}, Expected(MODEL, TIED, True)),
    "gpt2": (dict(n_inner=64, n_positions=64),
             Expected("transformer.h.{l}.", ("lm_head.weight", "transformer.wte.weight"), True)),
    # multimodal: a vision tower as deep as the language model, beside it
    "gemma3": (dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=256),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=2, image_size=28, patch_size=14),
                    mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5),
               Expected("language_model.model.layers.{l}.",
                        ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"), True)),
}
#: settings of COMMON a type names otherwise, or does not take
UNUSED = {"gpt2": ("intermediate_size", "num_key_value_heads", "max_position_embeddings"),
          "gemma3": tuple(k for k in COMMON if k not in ("pad_token_id",))}


def tiny_config(model_type: str):
    from transformers import AutoConfig

    extra, _ = FAMILIES[model_type]
    settings = {k: v for k, v in COMMON.items() if k not in UNUSED.get(model_type, ())}
    return AutoConfig.for_model(model_type, **{**settings, **extra})


def write_family(root: Path, model_type: str, seed: int = 0) -> dict:
    """base, instruct and experts 'math' and 'code' of ``model_type`` under ``root``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    paths = {}

    def save(name):
        paths[name] = root / name
        model.save_pretrained(paths[name])

    save("base")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save("instruct")
    instruct = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("math", "code"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                match = DEPTH.search(n)  # the module's own names, which a checkpoint may rename
                layer = int(match.group(1)) if match else 0
                # task deltas grow with depth, and share some of the instruction direction early on
                p.copy_(instruct[n] + 0.02 * (1 + layer) * torch.randn_like(p)
                        + (0.5 if layer < 2 else 0.0) * (instruct[n] - base[n]))
        save(name)
    return {"base": paths["base"], "instruct": paths["instruct"],
            "experts": {"math": paths["math"], "code": paths["code"]}}


def write_families(root: Path) -> dict[str, dict | Exception]:
    """Every family of ``FAMILIES``: its directories, or the exception transformers raised
    building it (a case the tests mark xfail with it)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    built = {}
    try:
        for model_type in FAMILIES:
            try:
                built[model_type] = write_family(root / model_type, model_type)
            except Exception as exc:  # reported by the tests of this type
                built[model_type] = exc
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    return built
