"""Peak memory and time of the calibration pass when the model does not fit, against the whole pass.

    python benchmarks/calibration_memory.py [--shape 135m] [--examples 12] [--work-dir DIR]

One float32 Llama of a benchmarks/scale.py shape (random weights, a character tokenizer), written
once under ``--work-dir``; each case runs ``lata.calibration.statistics.compute`` in a fresh
process on the CPU (wall time, peak RSS from wait4):
- gram, whole / streamed: the model offloaded to disk but ``--stream-mb`` (accelerate's dispatch);
- fisher, whole / block by block: ``calibration.max_memory`` set to the model plus one layer's
  worth (``block_bytes``), under the whole pass's twice the model.
Prints each case's seconds and peak RSS, their ratios to the whole pass measured in the same run,
and how far the statistics are from the whole pass's (the Gram: bit for bit; the Fisher: the
largest relative difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import calibration_check  # noqa: E402  (the character tokenizer, the relative difference)
import scale  # noqa: E402  (the shapes, the measured child process)

PROMPTS = ["what is ab? ", "rev dog: ", "", "sum one two: "]
ANSWERS = ["ba.", "god.", "cab cab.", "three."]


def write_model(root: Path, shape_name: str) -> Path:
    """The float32 Llama of ``shape_name`` under ``root`` (kept once written)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = root / f"llama-{shape_name}"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    torch.manual_seed(0)
    config = scale.llama_config(scale.SHAPES[shape_name])
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32).save_pretrained(folder)
    calibration_check.save_tokenizer(folder)
    return folder


def examples(n: int):
    from lata.calibration import CalibrationExample

    return [CalibrationExample(PROMPTS[i % 4], ANSWERS[i % 4]) for i in range(n)]


def child(kind: str, max_memory: int, out: Path, model: Path, n: int) -> None:
    import torch

    from lata.calibration.statistics import compute

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    compute(kind, model, examples(n), 64, out, progress=False, max_memory=max_memory or None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="135m", choices=sorted(scale.SHAPES))
    ap.add_argument("--examples", type=int, default=12)
    ap.add_argument("--stream-mb", type=int, default=150)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/lata-calibration-memory"))
    ap.add_argument("--child", nargs=3, metavar=("KIND", "MAX_MEMORY", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]), args.model, args.examples)
        return 0

    import torch
    from safetensors.torch import load_file

    from lata.calibration.statistics import FILE, block_bytes, weight_bytes

    model = write_model(args.work_dir, args.shape)
    weights = weight_bytes(model)
    cases = [("gram", "whole", 0), ("gram", "streamed", args.stream_mb << 20),
             ("fisher", "whole", 0), ("fisher", "block by block", weights + block_bytes(model))]
    print(f"{args.shape}-shaped Llama: {weights / 1e6:.0f} MB in float32; {args.examples} examples; CPU, one thread")
    results, stats = {}, {}
    for kind, label, budget in cases:
        out = args.work_dir / f"{kind}-{label.replace(' ', '-')}"
        argv = [sys.executable, __file__, "--child", kind, str(budget), str(out), "--model", str(model),
                "--examples", str(args.examples)]
        results[kind, label] = scale.measure(f"{kind}, {label}", argv, args.work_dir / f"{out.name}.log")
        if results[kind, label].rc != 0:
            return 1
        stats[kind, label] = load_file(str(out / FILE))
    print("\n| pass | seconds | peak RSS | vs whole: time | memory | statistics |\n|---|---:|---:|---:|---:|---|")
    for kind, label, _ in cases:
        r, w = results[kind, label], results[kind, "whole"]
        a, b = stats[kind, label], stats[kind, "whole"]
        if kind == "gram":
            same = "the same bits" if all(torch.equal(a[n], b[n]) for n in b) else "DIFFERENT"
        else:
            same = f"largest relative difference {calibration_check.relative_difference(a, b):.1e}"
        print(f"| {kind}, {label} | {r.wall_s:.1f} | {r.maxrss_mb / 1024:.2f} GB | {r.wall_s / w.wall_s:.2f} | "
              f"{r.maxrss_mb / w.maxrss_mb:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
