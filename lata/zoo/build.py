"""Build the zoo family: tokenizer, base (pretrained), instruct, and the math/code/ua experts.

Every role is a Hugging Face Llama checkpoint (``save_pretrained``) with the tokenizer (chat
template included) and a generation config. The build is deterministic for a config and
environment and is cached atomically (``lata.io.digests.cached_build``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lata.config import role_map
from lata.zoo.data import ZooData, environment_key, make_data, pretraining_corpus
from lata.zoo.presets import EXPERTS, ZooConfig, to_zoo_config
from lata.zoo.tasks import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, Example, chat_prompt

ZOO_CODE_VERSION = "2"
log = logging.getLogger("lata.zoo")


@dataclass(frozen=True)
class ZooFamily:
    """Paths of a built zoo: ``root/{base,instruct,math,code,ua,heldout}``."""

    root: Path
    base: Path
    instruct: Path
    experts: dict[str, Path]
    heldout: Path

    def roles(self) -> dict[str, Path]:
        """{role: checkpoint directory}: base, instruct, then the experts."""
        return role_map(self.base, self.instruct, self.experts)

    def __hash__(self) -> int:  # dict field: hash by root
        return hash(self.root)


def family_at(root: Path) -> ZooFamily:
    root = Path(root)
    return ZooFamily(root=root, base=root / "base", instruct=root / "instruct",
                     experts={e: root / e for e in EXPERTS}, heldout=root / "heldout")


# =========================================================================== tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE with single digits, chat special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # like Llama: plain ``tokenizer(text)`` starts with <s> (the chat template writes its own)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=model_max_length,
        padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


# =========================================================================== training


def _lr_at(step: int, steps: int, peak: float, cfg: ZooConfig) -> float:
    warm = max(1, int(steps * cfg.warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    lo = peak * cfg.min_lr_frac
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * t))


def _pack(ids: list[list[int]], seq_len: int) -> list[list[int]]:
    """Documents concatenated and cut into ``seq_len`` windows (pretraining)."""
    stream = [t for doc in ids for t in doc]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _chat_rows(tokenizer, examples: list[Example], max_len: int,
               response_only: bool) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per chat example; labels mask the prompt when ``response_only``.

    Prompt and answer are tokenised separately (as at inference, where the model continues the
    tokenised prompt), so a answer starting with spaces (code) keeps the same token boundary.
    """
    p_ids = tokenizer([chat_prompt(e.prompt) for e in examples], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    rows = []
    for p, r in zip(p_ids, r_ids):
        f = (p + r + [tokenizer.eos_token_id])[:max_len]
        labels = list(f)
        if response_only:
            n = min(len(p), len(f))
            labels[:n] = [-100] * n
        rows.append((f, labels))
    return rows


def _text_rows(base_rows: list[tuple[list[int], list[int]]], n: int, length: int,
               rng: random.Random) -> list[tuple[list[int], list[int]]]:
    """``n`` pretraining windows (cut to ``length``) mixed into fine-tuning against forgetting."""
    if not base_rows or n <= 0:
        return []
    return [(w[:length], w[:length]) for w, _ in (rng.choice(base_rows) for _ in range(n))]


def _batches(rows: list[tuple[list[int], list[int]]], batch_size: int, steps: int, pad_id: int,
             rng: random.Random, device: Any = "cpu") -> Iterator[tuple[Any, Any, Any]]:
    """``steps`` right-padded batches on ``device``; rows visited in shuffled epochs."""
    import torch

    order: list[int] = []
    for _ in range(steps):
        picked = []
        for _ in range(batch_size):
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            picked.append(rows[order.pop()])
        width = max(len(r[0]) for r in picked)
        inp = torch.full((batch_size, width), pad_id, dtype=torch.long)
        lab = torch.full((batch_size, width), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (x, y) in enumerate(picked):
            inp[i, :len(x)] = torch.tensor(x)
            lab[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        yield inp.to(device), mask.to(device), lab.to(device)


def train_stage(model, rows, steps: int, batch_size: int, lr: float, cfg: ZooConfig, pad_id: int,
                seed: int, desc: str, progress: bool) -> dict:
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    start, losses = time.perf_counter(), []
    device = next(model.parameters()).device
    bar = tqdm(_batches(rows, batch_size, steps, pad_id, random.Random(seed), device), total=steps,
               desc=f"zoo {cfg.name}: {desc}", disable=not progress, leave=True,
               dynamic_ncols=True)
    for step, (inp, mask, labels) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, cfg)
        loss = model(input_ids=inp, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 2),
            "final_loss": round(sum(tail) / len(tail), 4) if tail else None}


# =========================================================================== build


@contextmanager
def quiet_hf_bars() -> Iterator[None]:
    """Hugging Face's per-model progress bars ("Loading weights", "Writing shards") off within
    the block: noise when the zoo saves or loads many small models."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build(out: Path, cfg: ZooConfig, progress: bool, device: str = "cpu") -> None:
    import torch

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        data, tokenizer, base_rows, chat_rows = _prepare(cfg)
        stats: dict[str, Any] = {"prepare_seconds": round(time.perf_counter() - t0, 2), "stages": {}}
        _train_roles(out, cfg, tokenizer, base_rows, chat_rows, stats, progress, device)
        for task, rows in data.heldout.items():
            _write_jsonl(out / "heldout" / f"{task}.jsonl", rows)
        stats["build_seconds"] = round(time.perf_counter() - t0, 2)
        (out / "zoo_config.json").write_text(
            json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")
        (out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)


Rows = list[tuple[list[int], list[int]]]


def _prepare(cfg: ZooConfig) -> tuple[ZooData, Any, Rows, dict[str, Rows]]:
    """The zoo's data, the tokenizer trained on it, the packed pretraining windows and each
    fine-tuning stage's chat rows (with their share of pretraining text mixed in)."""
    data: ZooData = make_data(cfg)
    docs = pretraining_corpus(cfg, data)
    chat_texts = [e.text() for ex in data.train.values() for e in ex]
    tok_texts, size = [], 0
    for d in docs:  # tokenizer: the first tokenizer_chars of base text + all chat text
        if size >= cfg.tokenizer_chars:
            break
        tok_texts.append(d)
        size += len(d)
    tokenizer = train_tokenizer(tok_texts + chat_texts, cfg.vocab_size,
                                cfg.max_position_embeddings)
    base_ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
    base_rows = [(w, w) for w in _pack([[tokenizer.bos_token_id] + d + [tokenizer.eos_token_id]
                                        for d in base_ids], cfg.seq_len)]
    chat_rows = {k: _chat_rows(tokenizer, v, cfg.chat_seq_len, cfg.response_only_loss)
                 for k, v in data.train.items()}
    mix_rng = random.Random(cfg.seed * 1000 + 13)
    for k in chat_rows:  # a little plain text in every fine-tune keeps the language model
        chat_rows[k] = chat_rows[k] + _text_rows(
            base_rows, int(round(len(chat_rows[k]) * cfg.mix_text)), cfg.mix_text_len, mix_rng)
    return data, tokenizer, base_rows, chat_rows


def _train_roles(out: Path, cfg: ZooConfig, tokenizer, base_rows: Rows, chat_rows: dict[str, Rows],
                 stats: dict[str, Any], progress: bool, device: str) -> None:
    """Train base, then instruct from it, then each expert from instruct; save each role to
    ``out/<role>`` as it is done and record each stage in ``stats``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    pad_id = tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    gen = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                           do_sample=False, max_new_tokens=64)

    def save(model, role: str) -> None:
        model.generation_config = gen
        with quiet_hf_bars():
            model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(torch.float32).to(device)
    stats["device"] = str(device)
    stats["parameters"] = sum(p.numel() for p in model.parameters())
    stats["vocab_size"] = len(tokenizer)
    stats["base_tokens"] = sum(len(r[0]) for r in base_rows)
    stats["stages"]["base"] = train_stage(model, base_rows, cfg.base_steps, cfg.batch_size,
                                          cfg.base_lr, cfg, pad_id, cfg.seed, "base", progress)
    save(model, "base")
    stats["stages"]["instruct"] = train_stage(
        model, chat_rows["instruct"], cfg.instruct_steps, cfg.ft_batch_size, cfg.ft_lr, cfg,
        pad_id, cfg.seed + 1, "instruct", progress)
    save(model, "instruct")
    instruct_state = {k: v.clone() for k, v in model.state_dict().items()}
    steps = {"math": cfg.math_steps, "code": cfg.code_steps, "ua": cfg.ua_steps}
    expert_lr = cfg.expert_lr or cfg.ft_lr
    for k, role in enumerate(EXPERTS, start=2):
        model.load_state_dict(instruct_state)
        stats["stages"][role] = train_stage(
            model, chat_rows[role], steps[role], cfg.ft_batch_size, expert_lr, cfg, pad_id,
            cfg.seed + k, role, progress)
        save(model, role)


def cache_config(cfg: ZooConfig, device: str = "cpu") -> dict:
    """The cache key's inputs: the config, library versions and the kind of device trained on.

    A family trained on a GPU is the same kind of family but not the same numbers (other kernels,
    other summation order), so it is cached apart from the CPU one.
    """
    kind = str(device).split(":")[0]
    return {"zoo": dataclasses.asdict(cfg), "env": environment_key(),
            **({"device": kind} if kind != "cpu" else {})}


def build_zoo(cfg: Any, cache_dir: str | os.PathLike, progress: bool = True,
              device: str = "cpu") -> ZooFamily:
    """Build (or reuse from ``cache_dir``) the zoo family for ``cfg`` (ZooConfig or DictConfig).

    ``device``: where training runs (``cuda`` trains on the GPU; the same recipe and data).
    """
    from lata.io.digests import cached_build

    cfg = to_zoo_config(cfg)
    root = cached_build(Path(cache_dir), f"zoo-{cfg.name}", cache_config(cfg, device),
                        lambda tmp: _build(tmp, cfg, progress, device), ZOO_CODE_VERSION)
    return family_at(root)
