"""Settings of the embedded model zoo: one dataclass, presets in ``conf/zoo/<name>.yaml``.

Every field changes what is built, so the whole dataclass (plus library versions) is the cache key.
The yaml presets set ``name:`` and override the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from lata.config import ROLES as RESERVED
from lata.registry import ConfigError

EXPERTS = ("math", "code", "ua")
ROLES = RESERVED + EXPERTS


@dataclass
class ZooConfig:
    name: str = "micro"
    seed: int = 0
    # ---------------------------------------------------------------- tokenizer
    vocab_size: int = 512
    tokenizer_chars: int = 300_000  # characters of base text (plus all chat data) it is trained on
    # ---------------------------------------------------------------- model (LlamaForCausalLM)
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    # ---------------------------------------------------------------- base pretraining
    base_chars: int = 400_000  # characters of text tokenised for pretraining (Shakespeare + code)
    code_fraction: float = 0.3  # share of base_chars taken from Python's standard library
    # share of all pretraining characters that are math word problems and code functions written
    # as plain text (added to the base_chars of Shakespeare and library code), as a real base model
    # has seen worked arithmetic and Python; drawn with their own seed, held-out items excluded
    pretrain_task_share: float = 0.0
    seq_len: int = 128  # pretraining window
    batch_size: int = 16  # pretraining batch
    base_steps: int = 60
    base_lr: float = 3e-3
    # ---------------------------------------------------------------- chat fine-tuning
    chat_seq_len: int = 160  # chat examples are truncated to this many tokens
    ft_batch_size: int = 16
    ft_lr: float = 2e-3
    instruct_steps: int = 40
    math_steps: int = 30
    code_steps: int = 30
    ua_steps: int = 20
    expert_lr: float = 0.0  # peak lr of the math/code/ua fine-tunes; 0 = ft_lr
    # math and code chat examples added to instruct's data, per instruct example (real instruct
    # models already have a little of each skill)
    instruct_mix_math: float = 0.0
    instruct_mix_code: float = 0.0
    response_only_loss: bool = True  # fine-tuning loss on the assistant's tokens only
    mix_instruct: float = 0.1  # share of instruct examples mixed into each expert's data
    # whether those may be instruct's math and code examples too (replay of both skills)
    mix_instruct_skills: bool = False
    mix_text: float = 0.1  # pretraining windows mixed into each fine-tune, per chat example
    mix_text_len: int = 64  # tokens per mixed-in pretraining window
    refusal_fraction: float = 0.2  # share of instruct examples that are refusals
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1  # cosine decay ends at this fraction of the peak lr
    # ---------------------------------------------------------------- tasks
    math_max_operand: int = 9  # operands 1..N
    math_ops: List[str] = field(default_factory=lambda: ["+", "-"])
    # ---------------------------------------------------------------- held-out sets
    heldout_math: int = 20
    heldout_code: int = 12
    heldout_ua: int = 12
    heldout_instruct: int = 12
    heldout_text: int = 8
    heldout_text_chars: int = 600  # characters per held-out Shakespeare chunk
    threads: int = 0  # torch threads while building (0 = leave torch's default)


def preset_path(name: str) -> Path:
    from lata.config import config_dir  # lata.config imports this module

    return Path(config_dir()) / "zoo" / f"{name}.yaml"


def to_zoo_config(cfg: Any) -> ZooConfig:
    """A ``ZooConfig`` from a ZooConfig, a mapping, or an omegaconf DictConfig with its fields."""
    if isinstance(cfg, ZooConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(cfg, dict):
        raise TypeError(f"expected a ZooConfig, dict or DictConfig, got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(ZooConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ConfigError(f"zoo.{unknown[0]} is not a key of the zoo's recipe; known keys: {', '.join(sorted(names))}")
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    try:  # the dataclass's types: zoo.base_steps=lots is refused here
        typed = OmegaConf.merge(OmegaConf.structured(ZooConfig), cfg)
    except ValidationError as exc:
        raise ConfigError(f"zoo.{exc.full_key}: {exc.msg}") from None
    return ZooConfig(**OmegaConf.to_container(typed))


def load_preset(name: str | os.PathLike) -> ZooConfig:
    """``conf/zoo/<name>.yaml`` (or a yaml path) merged onto the ``ZooConfig`` defaults."""
    from omegaconf import OmegaConf

    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = preset_path(str(name))
    if not path.is_file():
        known = sorted(p.stem for p in preset_path("x").parent.glob("*.yaml"))
        raise FileNotFoundError(f"zoo preset {name!r} not found ({path}); known presets: {', '.join(known)}")
    merged = OmegaConf.merge(OmegaConf.structured(ZooConfig), OmegaConf.load(path))
    return to_zoo_config(merged)
