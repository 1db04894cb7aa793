"""``python -m lata.zoo --preset small``: build (or reuse) a zoo preset and print its report."""

from __future__ import annotations

import argparse
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
    args = ap.parse_args(argv)
    cfg = load_preset(args.preset)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    start = time.perf_counter()
    family = build_zoo(cfg, cache, progress=not args.quiet)
    print(f"zoo {cfg.name}: {family.root} ({time.perf_counter() - start:.1f} s)", flush=True)
    if not args.no_report:
        zoo_report(family, progress=not args.quiet)
        print(f"report: {family.root / 'zoo_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
