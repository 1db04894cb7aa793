"""The calibration pass and the data-aware merges on the CPU against an accelerator.

    python benchmarks/calibration_check.py --device cuda [--work-dir DIR] [--json FILE]

On the ``tiny`` family of benchmarks/scale.py (written once under ``--work-dir``, a character
tokenizer saved beside each checkpoint) with a few examples per expert:
1. Statistics: each expert's Fisher and Gram matrices computed on the CPU and on ``--device``;
   the largest relative difference of each kind (different kernels: close, not the same bits).
   The Fisher block by block (``fisher_by_block``: the model in RAM, one layer at a time on
   ``--device``) against the whole pass on the CPU: the largest relative difference.
2. Merges from the same statistics (the CPU's): Fisher and RegMean planned on the CPU and on
   ``--device``, every merged tensor compared bit for bit.
3. Learned weights: ``learn_weights`` (likelihood, 10 steps) on both; the largest difference.
4. The CLI with ``device=--device``: ``lata merge=fisher`` and ``merge=regmean`` with
   ``calibration=jsonl`` save a model; the library merges from the statistics that run cached
   (computed on the device), and the two must be the same bits.

Exits non-zero if a merge of step 2 or step 4 differs in any bit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scale  # noqa: E402  (the synthetic families)

CHARS = "abcdefghijklmnopqrstuvwxyz ?:."
EXAMPLES = [("what is ab? ", "ba."), ("rev dog: ", "god."), ("", "cab cab."), ("sum one two: ", "three.")]


def save_tokenizer(folder: Path) -> None:
    """A character-level tokenizer (one token per character, inside the tiny family's vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *CHARS])}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
                            unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(folder)


def statistics(kind: str, dirs: dict, examples, root: Path, device: str) -> dict:
    from lata.calibration.statistics import FILE, Statistics, compute

    out = {}
    for expert in scale.EXPERTS:
        folder = root / f"{kind}-{device.replace(':', '')}-{expert}"
        folder.mkdir(parents=True, exist_ok=True)
        compute(kind, dirs[expert], examples, 64, folder, device=device, progress=False)
        out[expert] = Statistics(folder / FILE, kind)
    return out


def relative_difference(x: dict, y: dict) -> float:
    """The largest |x - y| of a tensor over the largest |y| of that tensor, over the tensors of ``y``."""
    return max(float((x[n].double() - y[n].double()).abs().max() / y[n].double().abs().max().clamp_min(1e-30))
               for n in y)


def largest_relative(a: dict, b: dict) -> float:
    """``relative_difference`` of two experts' statistics (``Statistics``), the largest over the experts."""
    return max(relative_difference({n: a[e].get(n) for n in a[e].names}, {n: b[e].get(n) for n in a[e].names})
               for e in a)


def merged(family, method: str, stats: dict, device: str) -> dict:
    from lata import MergeConfig, WeightingConfig, merge_state_dict, plan_merge

    return merge_state_dict(plan_merge(family, MergeConfig(method=method), WeightingConfig(name="uniform"),
                                       statistics=stats, device=device, progress=False))


def differing(a: dict, b: dict) -> int:
    import torch

    assert set(a) == set(b)
    return sum(1 for n in a if not torch.equal(a[n].cpu(), b[n].cpu()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/lata-calibration"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from lata import Family
    from lata.accel.compute import check_device
    from lata.calibration import CalibrationExample
    from lata.calibration.learned import learn_weights
    from lata.calibration.statistics import FILE, Statistics, fisher, fisher_by_block, load_model
    from lata.run.fingerprints import checkpoint_digests

    check_device(args.device)
    dirs = scale.write_family(args.work_dir / "tiny", "tiny")
    for role in scale.ROLES:
        save_tokenizer(dirs[role])
    examples = [CalibrationExample(p, a) for p, a in EXAMPLES]
    family = Family.open(dirs["base"], dirs["instruct"], {k: dirs[k] for k in scale.EXPERTS})
    report: dict = {"device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    failures = 0

    for kind, method in (("fisher", "fisher"), ("gram", "regmean")):
        on_cpu = statistics(kind, dirs, examples, args.work_dir, "cpu")
        on_device = statistics(kind, dirs, examples, args.work_dir, args.device)
        report[f"{kind}_max_rel_diff"] = largest_relative(on_device, on_cpu)
        differ = differing(merged(family, method, on_cpu, "cpu"), merged(family, method, on_cpu, args.device))
        report[f"{method}_tensors_differing"] = differ
        failures += differ
        print(f"{kind}: largest relative difference CPU vs {args.device} {report[f'{kind}_max_rel_diff']:.3g}; "
              f"{method} from the same statistics: {'identical' if not differ else f'{differ} tensors differ'}")

    model, tokenizer = load_model(dirs["instruct"], "cpu")
    whole = fisher(model, tokenizer, examples, 64)
    model, tokenizer = load_model(dirs["instruct"], "cpu")
    by_block = fisher_by_block(model, tokenizer, examples, 64, args.device)
    report["fisher_by_block_max_rel_diff"] = relative_difference(by_block, whole)
    print(f"fisher block by block on {args.device} vs whole on the CPU: largest relative difference "
          f"{report['fisher_by_block_max_rel_diff']:.3g}")

    weights = {}
    for device in ("cpu", args.device):
        model, tokenizer = load_model(dirs["instruct"], device)
        weights[device] = learn_weights(model, tokenizer, family, [1.0, 1.0], 1.0, {k: examples for k in scale.EXPERTS},
                                        objective="likelihood", steps=10, lr=0.05)
    report["learned_max_abs_diff"] = max(abs(x - y) for k in scale.EXPERTS
                                         for x, y in zip(weights["cpu"][k], weights[args.device][k]))
    print(f"learned weights: largest difference CPU vs {args.device} {report['learned_max_abs_diff']:.3g}")

    files = {}
    for expert in scale.EXPERTS:
        files[expert] = args.work_dir / f"{expert}.jsonl"
        files[expert].write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in EXAMPLES))
    for kind, method in (("fisher", "fisher"), ("gram", "regmean")):
        out, cache = args.work_dir / f"cli-{method}", args.work_dir / f"cli-cache-{method}"
        cmd = [sys.executable, "-m", "lata", "model=paths", f"++model.base={dirs['base']}",
               f"++model.instruct={dirs['instruct']}", *(f"++model.experts.{k}={dirs[k]}" for k in scale.EXPERTS),
               "benchmark=none", f"merge={method}", "weighting=uniform", f"device={args.device}", "calibration=jsonl",
               "calibration.max_length=64", *(f"++calibration.files.{k}={v}" for k, v in files.items()),
               f"paths.cache_dir={cache}", f"paths.results_dir={args.work_dir / 'results'}", "resume=false",
               f"save_model={out}", "overwrite=true", f"hydra.run.dir={args.work_dir / ('run-' + method)}",
               "progress=false"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr[-3000:])
            report[f"cli_{method}"] = "failed"
            failures += 1
            continue
        built = {_checkpoint_of(f.parent): f for f in (cache / "calibration").glob(f"{kind}-*/{FILE}")}
        digests = checkpoint_digests({k: dirs[k] for k in scale.EXPERTS})
        # the statistics the run computed on the device and cached, by the expert they were computed from
        stats = {expert: Statistics(built[digests[expert]], kind) for expert in scale.EXPERTS}
        differ = differing(merged(family, method, stats, "cpu"), load_file(str(out / "model.safetensors")))
        report[f"cli_{method}_tensors_differing"] = differ
        failures += differ
        print(f"CLI {method} device={args.device}: {'identical to' if not differ else 'differs from'} the library's "
              f"merge from the same statistics")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


def _checkpoint_of(build: Path) -> str:
    """The content digest of the checkpoint a cached statistic was computed from (its build marker)."""
    from lata.io.digests import BUILD_MARKER, read_checked_json

    return read_checked_json(build / BUILD_MARKER)["config"]["checkpoint"]


if __name__ == "__main__":
    sys.exit(main())
