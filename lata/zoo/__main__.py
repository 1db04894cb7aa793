"""``python -m lata.zoo --preset small``: build (or reuse) a zoo preset and print its report
(roles, TA merges over a lambda grid, forgetting, and the bar: ``lata.zoo.report``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def default_cache_dir() -> Path:
    env = os.environ.get("LATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lata"


def main(argv: list[str] | None = None) -> int:
    from lata.zoo import build_zoo, load_preset
    from lata.zoo.report import zoo_report

    ap = argparse.ArgumentParser(prog="python -m lata.zoo", description=__doc__)
    ap.add_argument("--preset", default="small", help="conf/zoo/<preset>.yaml (default: small)")
    ap.add_argument("--cache-dir", default=None, help="default: $LATA_CACHE or ~/.cache/lata")
    ap.add_argument("--no-report", action="store_true", help="only build (or reuse) the zoo")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--seed", type=int, default=None, help="build seed (default: the preset's)")
    ap.add_argument("--device", default="cpu", help="where to train and evaluate: cpu (default), cuda, cuda:N")
    ap.add_argument("--grid", type=float, nargs="+", default=None,
                    help="lambdas of the TA math+code grid (default: 0.3 0.5 0.7 1.0 1.2 1.5)")
    args = ap.parse_args(argv)
    cfg = load_preset(args.preset)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    start = time.perf_counter()
    family = build_zoo(cfg, cache, progress=not args.quiet, device=args.device)
    print(f"zoo {cfg.name}: {family.root} ({time.perf_counter() - start:.1f} s)", flush=True)
    if not args.no_report:
        kwargs = {"grid": tuple(args.grid)} if args.grid else {}
        zoo_report(family, progress=not args.quiet, device=args.device, **kwargs)
        print(f"report: {family.root / 'zoo_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
