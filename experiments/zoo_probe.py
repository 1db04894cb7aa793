"""Zoo probe: which zoo recipe makes Task Arithmetic of two experts work?

Builds one configuration outside the zoo cache with the zoo's own data and training code:
tokenizer and base (cached in WORK per shape, base steps and task share), an instruct model
whose chat data mixes in INSTRUCT_MIX math and as much code, math/code/ua experts from it, then
scores instruct, each expert and TA merges of math + code (lambda 0.3 to 1.5) on 200 held-out
math, 100 code and 50 forbidden requests, with token perplexity on held-out Shakespeare, through
the lm-eval harness (``lata.zoo.report.Scorer``: the tasks of ``benchmark=zoo``).
Prints one JSON line per model; docs/zoo.md holds the results.

  python experiments/zoo_probe.py WORK INSTRUCT_MIX EXPERT_LR EXPERT_STEPS \
      [LAYERS=4] [BASE_STEPS=360] [HIDDEN=256] [TASK_SHARE=0] [SEED=0]

TASK_SHARE: share of the pretraining characters that are math word problems and code
functions in plain text (no chat tokens; other seeds than the held-out sets, which are excluded).
SEED: the zoo's build seed (data, held-out sets, initialisation).
"""
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lata.zoo.presets import load_preset
from lata.zoo.data import make_data, base_corpus
from lata.zoo.build import train_stage, _chat_rows, _text_rows, _pack, train_tokenizer
from lata.zoo.report import Scorer

torch.set_num_threads(2)
work = Path(sys.argv[1]); mix = float(sys.argv[2]); elr = float(sys.argv[3]); esteps = int(sys.argv[4])
layers = int(sys.argv[5]) if len(sys.argv) > 5 else 4
base_steps = int(sys.argv[6]) if len(sys.argv) > 6 else 360
hidden = int(sys.argv[7]) if len(sys.argv) > 7 else 256
task_share = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
seed = int(sys.argv[9]) if len(sys.argv) > 9 else 0
cfg = replace(load_preset("small"), num_hidden_layers=layers, base_steps=base_steps, hidden_size=hidden,
              intermediate_size=int(hidden * 688 / 256) // 8 * 8, heldout_math=200, heldout_code=100, seed=seed,
              pretrain_task_share=0.0, instruct_mix_math=0.0, instruct_mix_code=0.0)  # the probe mixes its own
t_all = time.time()
data = make_data(cfg)
docs = base_corpus(cfg)
if task_share:
    from lata.zoo.data import math_example, code_problem, code_example
    rm, rc = random.Random(991), random.Random(992)
    held_prompts = {x["question"] for x in data.heldout["math"]} | {x["prompt"] for x in data.heldout["code"]}
    total = sum(len(d) for d in docs)
    want, extra_docs, size = total * task_share / (1 - task_share), [], 0
    while size < want:
        chunk = []
        for _ in range(20):
            e = math_example(rm, cfg.math_max_operand, cfg.math_ops) if rm.random() < 0.5 else code_example(code_problem(rc))
            if e.prompt not in held_prompts:
                chunk.append(f"{e.prompt}\n{e.response}\n")
        text = "\n".join(chunk)
        extra_docs.append(text); size += len(text)
    docs = docs + extra_docs
    random.Random(993).shuffle(docs)
tag = f"L{layers}-h{hidden}-b{base_steps}-t{task_share}" + (f"-s{seed}" if seed else "")
bdir = work / f"base-{tag}"
if (bdir / "model.safetensors").is_file():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(bdir)
    model = LlamaForCausalLM.from_pretrained(bdir, dtype=torch.float32)
else:
    chat_texts = [e.text() for ex in data.train.values() for e in ex]
    tok_texts, size = [], 0
    for d in docs:
        if size >= cfg.tokenizer_chars:
            break
        tok_texts.append(d); size += len(d)
    tok = train_tokenizer(tok_texts + chat_texts, cfg.vocab_size, cfg.max_position_embeddings)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    ids = [e.ids for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
    rows = [(w, w) for w in _pack([[tok.bos_token_id] + d + [tok.eos_token_id] for d in ids], cfg.seq_len)]
    t = time.time()
    st = train_stage(model, rows, cfg.base_steps, cfg.batch_size, cfg.base_lr, cfg, tok.pad_token_id, cfg.seed, "base", False)
    model.save_pretrained(bdir); tok.save_pretrained(bdir)
    print(json.dumps({"stage": "base", "tag": tag, "params": sum(p.numel() for p in model.parameters()),
                      "seconds": round(time.time() - t), **st}), flush=True)
pad = tok.pad_token_id
ids = [e.ids for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
base_rows = [(w, w) for w in _pack([[tok.bos_token_id] + d + [tok.eos_token_id] for d in ids], cfg.seq_len)]
held = data.heldout


held_dir = work / f"heldout-{tag}"
for task, rows in held.items():
    held_dir.mkdir(parents=True, exist_ok=True)
    (held_dir / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
scorer = Scorer(held_dir, tok, work / f"harness-{tag}")


def score(m):
    s = scorer.score(m)
    return {k: s[k] for k in ("math", "code", "ua", "ppl")}


rng = random.Random(13)
mix_rng = random.Random(7)
inst_examples = list(data.train["instruct"])
n = len(inst_examples)
extra = [mix_rng.choice(data.train["math"]) for _ in range(int(n * mix))] + \
        [mix_rng.choice(data.train["code"]) for _ in range(int(n * mix))]
extra = [e for e in extra if e.kind in ("math", "code")]
inst_rows = _chat_rows(tok, inst_examples + extra, cfg.chat_seq_len, True)
inst_rows += _text_rows(base_rows, int(round(len(inst_rows) * cfg.mix_text)), cfg.mix_text_len, rng)
t = time.time()
train_stage(model, inst_rows, cfg.instruct_steps, cfg.ft_batch_size, cfg.ft_lr, cfg, pad, cfg.seed + 1, "instruct", False)
theta0 = {k: v.clone() for k, v in model.state_dict().items()}
s_inst = score(model)
print(json.dumps({"model": "instruct", "mix": mix, "train_s": round(time.time() - t), **s_inst}), flush=True)
experts = {}
for k, role in enumerate(("math", "code", "ua"), start=2):
    rows = _chat_rows(tok, data.train[role], cfg.chat_seq_len, True)
    rows += _text_rows(base_rows, int(round(len(rows) * cfg.mix_text)), cfg.mix_text_len, rng)
    model.load_state_dict(theta0)
    t = time.time()
    steps = esteps if role != "ua" else max(40, esteps // 3)
    train_stage(model, rows, steps, cfg.ft_batch_size, elr, cfg, pad, cfg.seed + k, role, False)
    experts[role] = {n_: v.clone() for n_, v in model.state_dict().items()}
    tv = {n_: experts[role][n_] - theta0[n_] for n_ in theta0}
    rel = (sum(v.pow(2).sum() for v in tv.values()) ** 0.5 / sum(v.pow(2).sum() for v in theta0.values()) ** 0.5).item()
    print(json.dumps({"model": role, "lr": elr, "steps": steps, "train_s": round(time.time() - t), "rel_norm": round(rel, 4),
                      **score(model)}), flush=True)
va, vb = ({n_: experts[r][n_] - theta0[n_] for n_ in theta0} for r in ("math", "code"))
dot = sum((va[n_] * vb[n_]).sum() for n_ in theta0)
cos = dot / (sum(v.pow(2).sum() for v in va.values()) ** 0.5 * sum(v.pow(2).sum() for v in vb.values()) ** 0.5)
print(json.dumps({"cos_math_code": round(float(cos), 4)}), flush=True)
for lam in (0.3, 0.5, 0.7, 1.0, 1.2, 1.5):
    model.load_state_dict({n_: theta0[n_] + lam * sum(experts[r][n_] - theta0[n_] for r in ("math", "code")) for n_ in theta0})
    print(json.dumps({"model": f"TA math+code lam={lam}", **score(model)}), flush=True)
print(json.dumps({"total_s": round(time.time() - t_all)}), flush=True)
