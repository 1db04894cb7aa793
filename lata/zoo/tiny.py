"""A tiny but real Llama family (base, instruct, math and code experts) built locally in seconds.

Every role is a genuine Hugging Face checkpoint produced by actual training on seeded synthetic
data: base from random init on template English, instruct fine-tuned from base on simple word
tasks, and two experts fine-tuned from instruct on arithmetic word problems and tiny Python
functions. Builds are deterministic for a given seed and environment, and cached.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

TINY_CODE_VERSION = "1"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Every setting that affects the result; it is also the cache key's config.
SETTINGS = {
    "vocab_size": 448,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "seq_len": 64,
    "batch_size": 16,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "steps": {"base": 64, "instruct": 48, "math": 32, "code": 32},
}
EXPERTS = ("math", "code")


@dataclass(frozen=True)
class TinyFamily:
    base: Path
    instruct: Path
    experts: dict[str, Path]


# --------------------------------------------------------------------------- synthetic data

_NAMES = ["Tom", "Ann", "Sam", "Lily", "Max", "Eva", "Ben", "Mia", "Leo", "Zoe"]
_NOUNS = ["cat", "dog", "bird", "tree", "house", "river", "child", "farmer", "teacher", "horse",
          "garden", "book", "city", "boat", "apple", "storm"]
_ADJS = ["big", "small", "old", "young", "red", "green", "quiet", "happy", "tall", "dark"]
_VERBS = ["sees", "likes", "finds", "follows", "helps", "watches", "paints", "visits"]
_PLACES = ["in the park", "near the river", "at home", "in the city", "by the sea",
           "under the tree", "on the hill"]
_TIMES = ["Every morning", "Yesterday", "At night", "In the summer", "Today", "Once"]
_WORDS = ["cat", "dog", "sun", "tree", "book", "moon", "fish", "lamp", "rain", "star", "bird",
          "apple", "river", "stone", "cloud", "green", "house", "paper", "music", "light"]
_ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "stickers", "marbles"]


def chat(instruction: str, response: str) -> str:
    """One example in the family's chat format."""
    return f"### Instruction:\n{instruction}\n### Response:\n{response}"


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    a, b = rng.choice(_NOUNS), rng.choice(_NOUNS)
    if kind == 0:
        return f"The {rng.choice(_ADJS)} {a} {rng.choice(_VERBS)} the {b}."
    if kind == 1:
        return f"{rng.choice(_TIMES)}, the {a} {rng.choice(_VERBS)} a {rng.choice(_ADJS)} {b}."
    if kind == 2:
        return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {a} {rng.choice(_PLACES)}."
    return f"The {a} is {rng.choice(_ADJS)} and the {b} is {rng.choice(_ADJS)}."


def generic_text(rng: random.Random, n: int) -> list[str]:
    """``n`` short English-like paragraphs from a small template grammar."""
    return [" ".join(_sentence(rng) for _ in range(rng.randint(2, 4))) for _ in range(n)]


def instruction_examples(rng: random.Random, n: int) -> list[str]:
    """``n`` chat examples of word tasks: reverse, uppercase, count letters, repeat."""
    out = []
    for _ in range(n):
        w = rng.choice(_WORDS)
        kind = rng.randrange(4)
        if kind == 0:
            out.append(chat(f"Reverse the word '{w}'.", w[::-1]))
        elif kind == 1:
            out.append(chat(f"Write the word '{w}' in uppercase.", w.upper()))
        elif kind == 2:
            out.append(chat(f"How many letters are in the word '{w}'?", str(len(w))))
        else:
            k = rng.randint(2, 4)
            out.append(chat(f"Repeat the word '{w}' {k} times.", " ".join([w] * k)))
    return out


def math_examples(rng: random.Random, n: int) -> list[str]:
    """``n`` chat examples of one-step arithmetic word problems with a ``#### answer`` line."""
    out = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            q, work, ans = f"{name} has {a} {item} and buys {b} more. How many {item}?", \
                f"{a} + {b} = {a + b}", a + b
        elif kind == 1:
            a = rng.randint(2, 20)
            b = rng.randint(1, a)
            q, work, ans = f"{name} has {a} {item} and gives away {b}. How many {item}?", \
                f"{a} - {b} = {a - b}", a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, work, ans = f"{name} has {a} bags with {b} {item} each. How many {item}?", \
                f"{a} * {b} = {a * b}", a * b
        out.append(chat(q, f"{work}\n#### {ans}"))
    return out


_BINARY = [("adds", "add", "+"), ("subtracts", "subtract", "-"), ("multiplies", "multiply", "*"),
           ("divides", "divide", "/")]
_PARAMS = ["a", "b", "x", "y", "m", "n", "p", "q"]


def code_examples(rng: random.Random, n: int) -> list[str]:
    """``n`` chat examples asking for tiny Python functions, answered with the code."""
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        p, q = rng.sample(_PARAMS, 2)
        if kind == 0:
            verb, name, op = rng.choice(_BINARY)
            out.append(chat(f"Write a function that {verb} {p} and {q}.",
                            f"def {name}({p}, {q}):\n    return {p} {op} {q}"))
        elif kind == 1:
            out.append(chat(f"Write a function that returns the square of {p}.",
                            f"def square({p}):\n    return {p} * {p}"))
        elif kind == 2:
            out.append(chat(f"Write a function that checks if {p} is even.",
                            f"def is_even({p}):\n    return {p} % 2 == 0"))
        else:
            fn = rng.choice(["max", "min"])
            out.append(chat(f"Write a function that returns the {fn} of {p} and {q}.",
                            f"def {fn}_of({p}, {q}):\n    return {fn}({p}, {q})"))
    return out


def _corpora(seed: int, s: dict) -> dict[str, list[str]]:
    n = {role: steps * s["batch_size"] for role, steps in s["steps"].items()}
    return {
        "base": generic_text(random.Random(seed + 0), n["base"]),
        "instruct": instruction_examples(random.Random(seed + 1), n["instruct"]),
        "math": math_examples(random.Random(seed + 2), n["math"]),
        "code": code_examples(random.Random(seed + 3), n["code"]),
    }


# --------------------------------------------------------------------------- build


def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD,
                                   model_max_length=SETTINGS["max_position_embeddings"])


def _batches(ids: list[list[int]], batch_size: int, steps: int, pad_id: int,
             rng: random.Random):
    """``steps`` right-padded (input_ids, attention_mask, labels) batches, shuffled by ``rng``."""
    import torch

    order = list(range(len(ids)))
    rng.shuffle(order)
    for step in range(steps):
        rows = [ids[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        width = max(map(len, rows))
        inp = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, r in enumerate(rows):
            inp[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        yield inp, mask, inp.masked_fill(mask == 0, -100)


def encode(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """``<s> text </s>`` token ids, truncated to ``seq_len``."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [([tokenizer.bos_token_id] + e + [tokenizer.eos_token_id])[:seq_len] for e in enc]


def _train(model, ids, steps: int, s: dict, pad_id: int, seed: int, desc: str,
           progress: bool) -> float:
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    loss_val = float("nan")
    bar = tqdm(_batches(ids, s["batch_size"], steps, pad_id, random.Random(seed)),
               total=steps, desc=f"tiny {desc}", disable=not progress, leave=False)
    for inp, mask, labels in bar:
        loss = model(input_ids=inp, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_val = loss.item()
        bar.set_postfix(loss=f"{loss_val:.3f}")
    bar.close()
    model.eval()
    return loss_val


def _build(out: Path, seed: int, progress: bool) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    s = SETTINGS
    corpora = _corpora(seed, s)
    tokenizer = _train_tokenizer([t for texts in corpora.values() for t in texts],
                                 s["vocab_size"])
    ids = {role: encode(tokenizer, texts, s["seq_len"]) for role, texts in corpora.items()}
    pad_id = tokenizer.pad_token_id

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"],
        max_position_embeddings=s["max_position_embeddings"], tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    gen = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                           do_sample=False, max_new_tokens=32)

    def save(model, role: str) -> None:
        model.generation_config = gen
        shard_bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' one-shard "Writing" bar is noise
        try:
            model.save_pretrained(out / role)
        finally:
            if shard_bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(out / role)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    _train(model, ids["base"], s["steps"]["base"], s, pad_id, seed, "base", progress)
    save(model, "base")
    _train(model, ids["instruct"], s["steps"]["instruct"], s, pad_id, seed + 1, "instruct",
           progress)
    save(model, "instruct")
    instruct_state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, role in enumerate(EXPERTS, start=2):
        model.load_state_dict(instruct_state)
        _train(model, ids[role], s["steps"][role], s, pad_id, seed + k, role, progress)
        save(model, role)


def build_tiny_family(cache_dir: str | os.PathLike, *, seed: int = 0,
                      progress: bool = True) -> TinyFamily:
    """Build (or reuse from ``cache_dir``) the tiny Llama family for ``seed``."""
    import torch
    import transformers

    from lata.zoo.cache import cached_build

    config = {"seed": seed, **SETTINGS, "torch": torch.__version__,
              "transformers": transformers.__version__}
    root = cached_build(Path(cache_dir), "tiny", config,
                        lambda tmp: _build(tmp, seed, progress), TINY_CODE_VERSION)
    return TinyFamily(base=root / "base", instruct=root / "instruct",
                      experts={role: root / role for role in EXPERTS})
