"""LATA's baselines that mergekit also has, run by both tools on the same family and compared
tensor by tensor, with recipes written here (these methods have no ``export=mergekit``).

    python benchmarks/mergekit_methods.py --mergekit /path/to/mergekit-yaml [--size tiny] [--work-dir DIR]

Cases, with uniform layer weights and lambda 1 (the settings where the two define the same merge):
``merge=soup`` against mergekit's ``linear`` over the experts (normalize true, weight 1 each) and
``merge=model_stock`` (``filter_wise`` false and true) against mergekit's ``model_stock`` with
the instruct model as its base. Prints, per case, the tensors bit-identical and the largest
|difference| (benchmarks/scale.py's comparison).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # noqa: E402


def recipes(dirs: dict[str, Path]) -> list[tuple[str, list[str], dict]]:
    experts = [str(dirs[k]) for k in scale.EXPERTS]
    linear = {"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
              "parameters": {"normalize": True}, "dtype": "float32"}
    stock = {"merge_method": "model_stock", "base_model": str(dirs["instruct"]),
             "models": [{"model": e} for e in experts], "dtype": "float32"}
    return [("soup vs linear", ["merge=soup"], linear),
            ("model_stock", ["merge=model_stock"], {**stock, "parameters": {"filter_wise": False}}),
            ("model_stock filter_wise", ["merge=model_stock", "merge.filter_wise=true"],
             {**stock, "parameters": {"filter_wise": True}})]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", required=True, help="path to mergekit-yaml (in its own virtual environment)")
    ap.add_argument("--size", default="tiny", choices=sorted(scale.SHAPES))
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lata-scale")
    args = ap.parse_args()
    dirs = scale.write_family(args.work_dir / args.size, args.size)
    out = args.work_dir / "mergekit-methods"
    family = ["model=paths", f"++model.base={dirs['base']}", f"++model.instruct={dirs['instruct']}",
              *(f"++model.experts.{k}={dirs[k]}" for k in scale.EXPERTS), "benchmark=none", "progress=false",
              "overwrite=true", "resume=false", "weighting=uniform", "out_dtype=float32"]
    print(f"{'case':<28} {'tensors':>8} {'identical':>10} {'max |lata - mergekit|':>22} {'values differing':>17}")
    for i, (label, options, recipe) in enumerate(recipes(dirs)):
        run, lata_out, mk_out = out / f"run{i}", out / f"lata{i}", out / f"mergekit{i}"
        subprocess.run([sys.executable, "-m", "lata", *family, *options, f"save_model={lata_out}",
                        f"hydra.run.dir={run}"], check=True, capture_output=True)
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        subprocess.run([args.mergekit, str(run / "recipe.yaml"), str(mk_out), "--no-copy-tokenizer",
                        "--no-write-model-card", "--quiet", "--allow-crimes"], check=True, capture_output=True)
        c = scale.compare_outputs(lata_out, mk_out)
        print(f"{label:<28} {c.tensors:8d} {c.identical:10d} {c.max_abs:22.3g} {c.differing:17.2%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
