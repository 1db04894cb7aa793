"""CPU against accelerator: every merge method x weighting gives the same bits on both.

    python benchmarks/device_check.py --device cuda [--size tiny] [--time-size 135m] [--json FILE]

1. On the ``--size`` family of benchmarks/scale.py (written once under ``--work-dir``), merges
   every registered method with every registered weighting, plus a forgetting merge (threshold
   weighting, lambda -1) and per-expert lambdas with anchor=base, once on the CPU (the sliced
   path, the default there) and once on ``--device`` (the staged path, the default there), with
   the same layer analysis, and compares every merged tensor bit for bit. Slices are kept small
   (``--chunk``) so that tensors span several of them on both paths. ``--device cpu`` checks
   the staged path on the CPU against the sliced one.
2. Compares the two layer analyses (pass 1 on each device): the largest relative difference of
   any similarity, and whether every weighting gives the same layer weights from both.
3. On the ``--time-size`` family (if given), times pass 1 and a merge to disk of TA and TIES
   (linear_rank) on the device, staged and sliced, in this process (warm page cache, after one
   untimed read of the inputs), and checks the two outputs are the same bits.

Exits non-zero if any merged tensor differs. Needs no mergekit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scale  # noqa: E402  (the synthetic families)


def cases(num_layers: int) -> list[tuple[str, dict, dict]]:
    """(label, merge, weighting) for every method x weighting, and the extra cases."""
    from lata.methods import METHODS
    from lata.weightings import WEIGHTINGS

    weightings = []
    for w in (w for w in WEIGHTINGS.names() if not WEIGHTINGS.get(w).needs_learning):  # learned: learned by a run
        params = {"weights": [round(0.2 + 0.8 * l / max(1, num_layers - 1), 3) for l in range(num_layers)]} \
            if w == "explicit" else {}
        weightings.append((w, {"name": w, **params}))
    data_free = [m for m in METHODS.names() if METHODS.get(m).statistic is None]  # fisher, regmean need calibration
    out = [(f"{m} + {w}", {"method": m}, wp) for m in data_free for w, wp in weightings]
    out += [("ties global + linear_rank", {"method": "ties", "topk_scope": "global"}, {"name": "linear_rank"}),
            ("forget: ta lam -1 + threshold 0.9", {"method": "ta", "lam": -1.0}, {"name": "threshold", "threshold": 0.9}),
            ("dare_ties lams + anchor base", {"method": "dare_ties", "lams": {"math": 0.8, "code": -0.3},
                                             "anchor": "base"}, {"name": "log_rank"})]
    return out


def compare(a, b) -> tuple[int, float]:
    """(tensors that differ in any bit or dtype, largest |a - b|) over two merges, tensor by tensor."""
    import torch

    differ, worst = 0, 0.0
    for (na, ta), (nb, tb) in zip(a, b):
        assert na == nb, (na, nb)
        if ta.dtype != tb.dtype or not torch.equal(ta, tb.to(ta.device)):
            differ += 1
            if ta.is_floating_point():
                worst = max(worst, float((ta.double() - tb.double().cpu()).abs().max()))
    return differ, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="tiny", choices=sorted(scale.SHAPES))
    ap.add_argument("--time-size", choices=sorted(scale.SHAPES))
    ap.add_argument("--chunk", type=int, default=4099, help="values per slice on both paths in step 1")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/lata-scale"))
    ap.add_argument("--no-identity", action="store_true", help="skip steps 1 and 2 (only time, with --time-size)")
    ap.add_argument("--gen-device", default="cpu", help="where the --time-size family is generated "
                    "(benchmarks/scale.py --gen-device)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from lata.accel.compute import check_device

    check_device(args.device)
    report: dict = {"device": args.device, "torch": torch.__version__, "size": args.size}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    failures = 0
    if not args.no_identity:
        failures = identity(args, report)
    if args.time_size:
        root = args.work_dir / scale.family_dir(args.time_size, args.gen_device)
        scale.check_disk(root, args.time_size)
        report["timing"] = timing(args, scale.write_family(root, args.time_size, args.gen_device))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failures else 0


def identity(args, report: dict) -> int:
    """Steps 1 and 2; returns how many merged tensors differ."""
    from lata import Family, MergeConfig, WeightingConfig, iter_merged, plan_merge
    from lata.analysis import layer_similarities

    dirs = scale.write_family(args.work_dir / args.size, args.size)
    family = Family.open(dirs["base"], dirs["instruct"], {k: dirs[k] for k in scale.EXPERTS})

    on_cpu = layer_similarities(family, progress=False)
    on_device = layer_similarities(family, device=args.device, progress=False, staged=True)
    rel = max(abs(x - y) / max(abs(x), 1e-30) for k in on_cpu.experts
              for x, y in zip(on_cpu.similarities[k], on_device.similarities[k]))
    report["similarity_max_rel_diff"] = rel
    print(f"pass 1: largest relative difference of a similarity, CPU sliced vs {args.device} staged: {rel:.3g}")

    failures, rows, same_weights = 0, [], []
    for label, merge, weighting in cases(family.num_layers):
        plans = []
        for device, analysis in (("cpu", on_cpu), (args.device, on_cpu)):
            plan = plan_merge(family, MergeConfig(**merge), WeightingConfig(**weighting), device=device,
                              analysis=analysis, progress=False)
            plan = plan.with_options(chunk_size=args.chunk)
            plans.append(plan)
        # staged: the default on an accelerator; named, so that --device cpu checks it too
        plans[1] = plans[1].with_options(staged=True)
        own = plan_merge(family, MergeConfig(**merge), WeightingConfig(**weighting), device=args.device,
                         analysis=on_device, progress=False)
        same_weights.append(own.weights == plans[0].weights)
        differ, worst = compare(iter_merged(plans[0], progress=False), iter_merged(plans[1], progress=False))
        failures += differ
        rows.append({"case": label, "tensors_differing": differ, "max_abs_diff": worst,
                     "same_weights_from_own_analysis": same_weights[-1]})
        print(f"  {label:<40} {'identical' if not differ else f'{differ} tensors differ (max {worst:.3g})'}"
              f"{'' if same_weights[-1] else '  (weights from the device analysis differ)'}", flush=True)
    report["cases"] = rows
    print(f"{len(rows)} cases, {sum(r['tensors_differing'] == 0 for r in rows)} bit-identical; "
          f"layer weights from each device's own analysis equal in {sum(same_weights)} of {len(rows)}")
    return failures


def timing(args, dirs) -> list[dict]:
    """Pass 1 and merges to disk on the device, staged and sliced, timed in this process."""
    import torch

    from lata import Family, MergeConfig, WeightingConfig, merge_to_dir, plan_merge
    from lata.analysis import layer_similarities

    inputs = sorted(p for r in scale.ROLES for p in dirs[r].glob("*.safetensors"))
    out_root = args.work_dir / "device-check"
    rows = []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for staged in (True, False):
        family = Family.open(dirs["base"], dirs["instruct"], {k: dirs[k] for k in scale.EXPERTS})
        scale.warm(inputs)
        t0 = time.perf_counter()
        analysis = layer_similarities(family, device=args.device, progress=False, staged=staged)
        sync()
        rows.append({"step": "pass 1", "staged": staged, "s": time.perf_counter() - t0})
        for method, options in (("ta", {}), ("ties", {"density": 0.2})):
            plan = plan_merge(family, MergeConfig(method=method, **options), WeightingConfig(name="linear_rank"),
                              device=args.device, analysis=analysis, progress=False)
            plan = plan.with_options(staged=staged)
            scale.warm(inputs)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            merge_to_dir(plan, out_root / f"{method}-{staged}", overwrite=True, progress=False)
            rows.append({"step": f"{method} linear_rank merge", "staged": staged, "s": time.perf_counter() - t0,
                         "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0})
            if not staged:  # both written: compare, then free the disk
                a, b = out_root / f"{method}-True", out_root / f"{method}-False"
                rows.append({"step": f"{method} staged vs sliced", "max_abs_diff": scale.compare_outputs(a, b).max_abs})
                shutil.rmtree(a)
                shutil.rmtree(b)
    for r in rows:
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return rows


if __name__ == "__main__":
    sys.exit(main())
