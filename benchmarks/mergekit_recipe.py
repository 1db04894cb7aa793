"""The same merge from LATA and from mergekit, compared tensor by tensor.

    python benchmarks/mergekit_recipe.py --mergekit /path/to/mergekit-yaml [--size tiny] [--work-dir DIR]

On a synthetic family of benchmarks/scale.py (``--size``), each case runs ``lata ...
save_model=... export=mergekit`` and ``mergekit-yaml`` (mergekit installed in its own
environment) on the recipe LATA wrote (``mergekit.yaml`` in the run directory), and prints how
many tensors are bit-identical and the largest |difference|.

Expected (lata.results.mergekit, docs/method.md): task arithmetic identical where lambda is 1
and within float32 rounding otherwise; TIES differing where mergekit's int(density * n) and
LATA's ceil keep different values, and where the agreeing experts' weights are not all 1
(mergekit divides by their sum, LATA by their count); ``soup`` against mergekit's ``linear``,
``model_stock``, ``sce``, ``slerp`` and ``nuslerp`` against mergekit's own within float32
rounding (docs/method.md names each cause).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402

#: (label, LATA's options)
CASES = [
    ("ta, linear_rank, lam 1", ["merge=ta", "weighting=linear_rank"]),
    ("ta, linear_rank, lam 0.7", ["merge=ta", "weighting=linear_rank", "merge.lam=0.7"]),
    ("ta, uniform, rest_weight 0.5", ["merge=ta", "weighting=uniform", "weighting.rest_weight=0.5"]),
    ("ties, uniform", ["merge=ties", "weighting=uniform"]),
    ("ties, linear_rank", ["merge=ties", "weighting=linear_rank"]),
    ("soup vs linear", ["merge=soup", "weighting=uniform"]),
    ("soup vs linear, lams", ["merge=soup", "weighting=uniform", "++merge.lams.code=0.5"]),
    ("model_stock", ["merge=model_stock", "weighting=uniform"]),
    ("model_stock filter_wise", ["merge=model_stock", "merge.filter_wise=true", "weighting=uniform"]),
    ("sce", ["merge=sce", "weighting=uniform"]),
    ("sce, select_topk 0.3", ["merge=sce", "merge.select_topk=0.3", "weighting=uniform"]),
    ("slerp", ["merge=slerp", "weighting=uniform"]),
    ("slerp, t 0.3, lines", ["merge=slerp", "merge.t=0.3", "weighting=lines"]),
    ("nuslerp", ["merge=nuslerp", "weighting=uniform"]),
    ("nuslerp, lines, lams", ["merge=nuslerp", "weighting=lines", "++merge.lams.code=0.5"]),
    ("nuslerp per row", ["merge=nuslerp", "merge.nuslerp_flatten=false", "weighting=uniform"]),
    ("nuslerp per column", ["merge=nuslerp", "merge.nuslerp_flatten=false", "merge.nuslerp_row_wise=true",
                            "weighting=uniform"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="path to mergekit-yaml (in its own virtual environment)")
    ap.add_argument("--size", default="tiny", choices=sorted(scale.SHAPES))
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lata-scale")
    ap.add_argument("--only", help="run the cases whose label contains this text")
    args = ap.parse_args()
    dirs = scale.write_family(args.work_dir / args.size, args.size)
    out = args.work_dir / "mergekit-recipe"
    family = ["model=paths", f"++model.base={dirs['base']}", f"++model.instruct={dirs['instruct']}",
              *(f"++model.experts.{k}={dirs[k]}" for k in scale.EXPERTS), "benchmark=none", "progress=false",
              "overwrite=true", "resume=false"]
    print(f"{'case':<32} {'tensors':>8} {'identical':>10} {'max |lata - mergekit|':>22} {'values differing':>17}")
    for i, (label, options) in enumerate(CASES):
        if args.only and args.only not in label:
            continue
        run, lata_out, mk_out = out / f"run{i}", out / f"lata{i}", out / f"mergekit{i}"
        subprocess.run([sys.executable, "-m", "lata", *family, *options, "export=mergekit", f"save_model={lata_out}",
                        f"hydra.run.dir={run}"], check=True, capture_output=True)
        recipe_file = run / "mergekit.yaml"
        subprocess.run([args.mergekit, str(recipe_file), str(mk_out), "--no-copy-tokenizer",
                        "--no-write-model-card", "--quiet", "--allow-crimes"], check=True, capture_output=True)
        c = scale.compare_outputs(lata_out, mk_out)
        print(f"{label:<32} {c.tensors:8d} {c.identical:10d} {c.max_abs:22.3g} {c.differing:17.2%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
