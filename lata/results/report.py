"""``lata-report``: every run under a sweep (or one run) directory as a table and plots.

Reads each ``summary.json`` under the path (``.hydra``, ``wandb`` and other hidden folders are
skipped; ``lata.results.tables`` makes the rows) and writes, atomically, into the output
directory (default: the path itself):

  results.csv                     one row per point: its parameters, every numeric metric as
                                  ``task/metric`` (``samples`` left out) and ``task_score``
  results.md                      the primary metric per task and task_score; the best lambda
                                  per method x weighting; the plots; the points that failed
  lambda_<task>.png,              each task's primary metric (and task_score) against lambda,
  lambda_task_score.png           one line per method x weighting; unmerged models dashed
  best_lambda.png                 every method x weighting at its best lambda (grouped bars)
  tradeoff_<ppl task>.png         task_score against token perplexity, one point per run

A plot without its data (no ppl task, no task_score, one lambda per line) is not written
(``lata.results.plots``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from lata.io.atomic import write_text_atomic
from lata.results.plots import best_lambda_plot, lambda_plot, tradeoff_plot
from lata.results.tables import best_points, collect, fmt, point_part, primary_columns

log = logging.getLogger("lata")

#: a sweep job's record of its failed point, in its run directory (written by the ``lata`` command)
FAILED_FILE = "failed.json"


def failed_points(path: str | os.PathLike) -> list[dict]:
    """The sweep points under ``path`` that failed (``FAILED_FILE`` in their run directories),
    by job number."""
    found = []
    for file in Path(path).rglob(FAILED_FILE):
        try:
            found.append({"run": file.parent.relative_to(path).as_posix(), **json.loads(file.read_text())})
        except (OSError, ValueError, TypeError) as exc:  # TypeError: not a JSON object
            log.warning("skipping %s: %s", file, exc)
    return sorted(found, key=lambda f: (f.get("job", 0), f["run"]))


def build_report(path: str | os.PathLike, out: str | os.PathLike | None = None,
                 table: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write results.csv, results.md and the plots for the runs under ``path`` (and, in
    results.md, the points that failed); return {file name: path}. ``table``: ``collect(path)``,
    where the caller has it already."""
    failed = failed_points(path)
    out = Path(out) if out is not None else Path(path)
    try:
        table = collect(path) if table is None else table
    except FileNotFoundError:
        if not failed:
            raise
        out.mkdir(parents=True, exist_ok=True)
        text = f"# LATA results: {Path(path).resolve().name}\n\nNo point finished.\n" + _failed_markdown(failed)
        return {"results.md": write_text_atomic(out / "results.md", text)}
    out.mkdir(parents=True, exist_ok=True)
    written = {"results.csv": write_text_atomic(out / "results.csv", table.to_csv(index=False))}
    plots = draw_plots(table, out)
    written["results.md"] = write_text_atomic(out / "results.md", _markdown(table, Path(path).resolve().name, plots)
                                              + _failed_markdown(failed))
    written.update(plots)
    return written


def draw_plots(table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """The report's PNGs of ``table`` that have their data, written into ``out``: {file name: path}."""
    plots = {}
    for column in primary_columns(table) + ["task_score"]:
        name = f"lambda_{column.split('/', 1)[0]}.png"
        if lambda_plot(table, column, out / name):
            plots[name] = out / name
    if best_lambda_plot(table, out / "best_lambda.png"):
        plots["best_lambda.png"] = out / "best_lambda.png"
    for column in table.columns:
        if column.endswith("/token_perplexity"):
            name = f"tradeoff_{column.split('/', 1)[0]}.png"
            if tradeoff_plot(table, column, out / name):
                plots[name] = out / name
    return plots


def _markdown(table: pd.DataFrame, title: str, plots: dict[str, Path]) -> str:
    metrics = primary_columns(table) + ["task_score"]
    points = [c for c in point_part(table) if table[c].notna().any()]
    references = int((table["evaluated"] != "merged").sum())
    parts = [f"# LATA results: {title}", "",
             f"{len(table)} point(s), {references} of them unmerged references. Every metric of every "
             "run is in results.csv.", "", "## Points", "", _md_table(table[points + metrics])]
    best = best_points(table)
    if not best.empty:
        parts += ["", "## Best lambda per method x weighting (highest task_score)", "",
                  _md_table(best[["series", "lam", "run"] + metrics])]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in plots]
    return "\n".join(parts) + "\n"


def _failed_markdown(failed: list[dict]) -> str:
    if not failed:
        return ""
    rows = pd.DataFrame([{"run": f["run"], "overrides": " ".join(f.get("overrides", [])),
                          "error": f"{f.get('type', 'Error')}: {f.get('error', '')}".replace("|", "/").replace("\n", " ")}
                         for f in failed])
    return f"\n## Failed points ({len(failed)}: the same command runs them again)\n\n" + _md_table(rows) + "\n"


def _md_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lata-report", description="Tables and plots of the LATA runs "
                                     "under a sweep (or run) directory: results.csv, results.md, PNGs.")
    parser.add_argument("path", help="a multirun sweep directory or one run directory")
    parser.add_argument("--out", default=None, help="where to write the report (default: PATH)")
    args = parser.parse_args(argv)
    try:
        written = build_report(args.path, args.out)
    except FileNotFoundError as exc:
        print(f"lata-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"lata-report: wrote {len(written)} files to {Path(args.out or args.path)}")
    for name, path in written.items():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
