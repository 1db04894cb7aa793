"""``lata-report``: every run under a sweep (or one run) directory as a table and plots.

Reads each ``summary.json`` under the path (``.hydra``, ``wandb`` and other hidden folders are
skipped) and writes, atomically, into the output directory (default: the path itself):

  results.csv                     one row per point: its parameters, every numeric metric as
                                  ``task/metric`` (``samples`` left out) and ``task_score``
  results.md                      the primary metric per task and task_score; the best lambda
                                  per method x weighting; the plots
  lambda_<task>.png,              each task's primary metric (and task_score) against lambda,
  lambda_task_score.png           one line per method x weighting; unmerged models dashed
  best_lambda.png                 every method x weighting at its best lambda (grouped bars)
  tradeoff_<ppl task>.png         task_score against token perplexity, one point per run

Decisions:
- The parameter columns are the keys the method and weighting registries declare
  (``lata.methods.METHODS``, ``lata.weightings.WEIGHTINGS``); a row fills only those its own
  method and weighting have (density: TIES, Breadcrumbs, DELLA; p: DARE; drop: the rank
  weightings; ...), so an unused key neither splits lines nor tells two identical merges apart,
  and a column no row fills is left out. A method the report cannot import (a user's own,
  given by dotted path) keeps every key its summary recorded. Reference rows (``merge=none``)
  have no merge parameters; ``evaluated`` names the unmerged role (``merged`` for every merge).
- ``experts`` (the merged experts), ``target``, ``anchor``, ``normalize`` and ``rest_weight``
  are columns only where the runs differ in them (a sweep over expert sets or an ablation).
- Two runs of the same point (the runner's ``point`` key: same checkpoint contents, merge,
  weighting and benchmark; for older summaries the family, method and weighting with their used
  parameters), e.g. a resumed sweep, keep one row: the most recently written summary.json.
- A line is a method x weighting; when the sweep also varies lams or any parameter column, the
  varying values join the line's name so one line never mixes them.
- The best lambda of a line has the highest task_score (lower lambda on a tie).
- A plot without its data (no ppl task, no task_score, one lambda per line) is not written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
from matplotlib import colormaps

from lata.io.atomic import write_text_atomic
from lata.evaluation.tasks import LOWER_IS_BETTER, mean_task_score, primary_metric
from lata.methods import METHODS
from lata.results.plots import new_figure, save_figure
from lata.registry import ConfigError, Registry
from lata.weightings import WEIGHTINGS

log = logging.getLogger("lata")

def parameter_columns() -> list[str]:
    """Every key a registered method or weighting declares, in registry order, once."""
    keys = [k for registry in (METHODS, WEIGHTINGS) for name in registry.names() for k in registry.parameters(name)]
    return list(dict.fromkeys(keys))


#: what a point merged besides its method and weighting; a column only where a sweep varies it
CONTEXT_COLUMNS = ["experts", "target", "anchor", "normalize", "rest_weight"]


def point_columns() -> list[str]:
    return ["run", "method", "lam", "lams", "weighting", *parameter_columns(), *CONTEXT_COLUMNS, "evaluated"]


def _own_keys(registry: Registry, name: str | None, node: dict, common: tuple[str, ...]) -> list[str]:
    """The keys part ``name`` declares; for a part the report cannot import, every recorded key."""
    try:
        return list(registry.parameters(name))
    except ConfigError:
        return [k for k in node if k not in common]


# --------------------------------------------------------------------------- one run -> one row

def effective_point(summary: dict) -> dict:
    """The parameters that define a run's point: those its method and weighting use."""
    merge, weighting = summary.get("merge") or {}, summary.get("weighting") or {}
    method = merge.get("method")
    if method == "none":
        return {"method": "none", "evaluated": summary.get("evaluated")}
    point = {"method": method, "lam": merge.get("lam"), "lams": merge.get("lams") or {},
             "anchor": merge.get("anchor")}
    point.update({k: merge.get(k) for k in _own_keys(METHODS, method, merge, ("method", "lam", "lams", "anchor"))})
    name = weighting.get("name")
    point.update(weighting=name, normalize=weighting.get("normalize"), rest_weight=weighting.get("rest_weight"))
    point.update({k: weighting.get(k) for k in _own_keys(WEIGHTINGS, name, weighting,
                                                         ("name", "normalize", "rest_weight"))})
    return point


def result_row(summary: dict, run: str = ".") -> dict:
    """One results row: ``point_columns()``, every numeric metric as ``task/metric``, task_score."""
    point = effective_point(summary)
    columns = point_columns()
    unlisted = [k for k in point if k not in columns]
    row = {c: _cell(point.get(c)) for c in columns + unlisted}  # unlisted: a user method's recorded keys
    family = summary.get("family") or {}
    if point.get("method") != "none":  # the experts merged and where (model.target), by role or path
        row["experts"] = "+".join(sorted(family.get("experts") or {})) or None
        row["target"] = _role_of(family.get("target"), family)
    row["run"] = run
    row["lams"] = ",".join(f"{k}={v:g}" for k, v in sorted(point.get("lams", {}).items())) or None
    row["evaluated"] = point.get("evaluated") or "merged"
    metrics = summary.get("metrics") or {}
    for task in sorted(metrics):
        for name in sorted(metrics[task]):
            value = metrics[task][name]
            if name != "samples" and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"{task}/{name}"] = float(value)
    row["task_score"] = mean_task_score(metrics)
    return row


def point_name(row: dict) -> str:
    """A short human name of a row's point, e.g. ``ties+log_rank lam=0.5 drop=0.5 density=0.2``."""
    if row.get("evaluated", "merged") != "merged":
        return f"{row['evaluated']} (unmerged)"
    extra = " ".join(f"{k}={_fmt(row[k])}" for k in ["lams", *parameter_columns()] if _present(row.get(k)))
    return f"{row['method']}+{row['weighting']} lam={_fmt(row['lam'])}" + (f" {extra}" if extra else "")


# --------------------------------------------------------------------------- a directory -> table

def collect(path: str | os.PathLike) -> pd.DataFrame:
    """One row per point under ``path``, references first, then by method, weighting, lambda."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give a run or sweep directory")
    found = []
    for file in root.rglob("summary.json"):
        parts = file.relative_to(root).parts[:-1]
        if any(p.startswith(".") or p == "wandb" for p in parts):
            continue
        try:
            summary = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", file, exc)
            continue
        if not isinstance(summary, dict):
            log.warning("skipping %s: not a JSON object", file)
            continue
        found.append((file.stat().st_mtime, file, summary))
    if not found:
        raise FileNotFoundError(f"no summary.json under {root}: give a run or sweep directory")
    rows: dict[str, dict] = {}
    for _, file, summary in sorted(found, key=lambda item: (item[0], str(item[1]))):  # newest last: it wins
        # the runner's point key (checkpoint contents, merge, weighting, benchmark) when present
        key = summary.get("point") or json.dumps([summary.get("family"), effective_point(summary)],
                                                 sort_keys=True, default=str)
        rows[key] = result_row(summary, run=file.parent.relative_to(root).as_posix())
    if len(rows) < len(found):
        log.info("%d duplicate run(s) of the same point: kept the newest of each", len(found) - len(rows))
    table = pd.DataFrame(list(rows.values()))
    metric_columns = sorted(c for c in table.columns if "/" in c)
    columns = point_columns() + [c for c in table.columns if c not in point_columns() and "/" not in c
                                 and c != "task_score"]
    merged = table["evaluated"] == "merged"
    columns = [c for c in columns if (c not in parameter_columns() or table[c].notna().any())
               and (c not in CONTEXT_COLUMNS or table.loc[merged, c].nunique(dropna=False) > 1)]
    table = table.reindex(columns=columns + metric_columns + ["task_score"])
    order = table.assign(_ref=table["evaluated"] == "merged")
    order = order.sort_values(["_ref", "method", "weighting", "lam", "evaluated", "run"], na_position="first",
                              kind="stable")
    return table.loc[order.index].reset_index(drop=True)


def series_labels(table: pd.DataFrame) -> pd.Series:
    """Line name of each merged row: method + weighting, plus any parameter the sweep varies."""
    merged = table["evaluated"] == "merged"
    varying = [c for c in _series_params(table) if table.loc[merged, c].dropna().nunique() > 1]

    def label(row: pd.Series) -> str | None:
        if row["evaluated"] != "merged":
            return None
        extra = " ".join(f"{c}={_fmt(row[c])}" for c in varying if _present(row[c]))
        return f"{row['method']} + {row['weighting']}" + (f" {extra}" if extra else "")

    return table.apply(label, axis=1)


def best_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per line (``series_labels``), the merged row with the highest task_score (lower lambda on a tie)."""
    rows = table.assign(series=series_labels(table))
    rows = rows[(rows["evaluated"] == "merged") & rows["task_score"].notna()]
    if rows.empty:
        return rows
    rows = rows.sort_values(["series", "task_score", "lam"], ascending=[True, False, True], kind="stable")
    return rows.groupby("series", sort=True).head(1).reset_index(drop=True)


def _point_part(table: pd.DataFrame) -> list[str]:
    """The table's columns that describe points (not metrics)."""
    return [c for c in table.columns if "/" not in c and c != "task_score"]


def _series_params(table: pd.DataFrame) -> list[str]:
    return [c for c in _point_part(table) if c not in ("run", "method", "lam", "weighting", "evaluated")]


def _role_of(path: str | None, family: dict) -> str | None:
    """A target as the family's role name where it is one of the family's checkpoints."""
    if not path:
        return None
    roles = {**(family.get("experts") or {}), "base": family.get("base"), "instruct": family.get("instruct")}
    return next((role for role, p in roles.items() if p == path), path)


def _cell(value):
    """A list parameter (explicit weights) as one table cell."""
    return ",".join(f"{x:g}" for x in value) if isinstance(value, list) else value


def primary_columns(table: pd.DataFrame) -> list[str]:
    """``task/<primary metric>`` of every task in the table that reports it."""
    tasks = sorted({c.split("/", 1)[0] for c in table.columns if "/" in c})
    return [f"{t}/{primary_metric(t)}" for t in tasks if f"{t}/{primary_metric(t)}" in table.columns]


def _lower_is_better(column: str) -> bool:
    return column.split("/", 1)[-1] in LOWER_IS_BETTER


# --------------------------------------------------------------------------- the report

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
    plots = {}
    for column in primary_columns(table) + ["task_score"]:
        name = f"lambda_{column.split('/', 1)[0]}.png"
        if _plot_vs_lambda(table, column, out / name):
            plots[name] = out / name
    if _plot_best(table, out / "best_lambda.png"):
        plots["best_lambda.png"] = out / "best_lambda.png"
    for column in table.columns:
        if column.endswith("/token_perplexity"):
            name = f"tradeoff_{column.split('/', 1)[0]}.png"
            if _plot_tradeoff(table, column, out / name):
                plots[name] = out / name
    written["results.md"] = write_text_atomic(out / "results.md", _markdown(table, Path(path).resolve().name, plots)
                                              + _failed_markdown(failed))
    written.update(plots)
    return written


def _markdown(table: pd.DataFrame, title: str, plots: dict[str, Path]) -> str:
    metrics = primary_columns(table) + ["task_score"]
    points = [c for c in _point_part(table) if table[c].notna().any()]
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
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def _plot_vs_lambda(table: pd.DataFrame, column: str, path: Path) -> bool:
    rows = table.assign(series=series_labels(table))
    merged = rows[(rows["evaluated"] == "merged") & rows[column].notna() & rows["lam"].notna()]
    if merged.empty or merged.groupby("series")["lam"].nunique().max() < 2:
        return False
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for series, group in merged.groupby("series", sort=True):
        group = group.sort_values("lam")
        ax.plot(group["lam"], group[column], marker="o", label=series)
    _reference_lines(ax, rows, column)
    ax.set_xlabel("lambda")
    ax.set_ylabel(column + (" (lower is better)" if _lower_is_better(column) else ""))
    ax.set_title(f"{column} against lambda")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _reference_lines(ax, rows: pd.DataFrame, column: str) -> None:
    references = rows[(rows["evaluated"] != "merged") & rows[column].notna()]
    for i, (_, ref) in enumerate(references.iterrows()):
        color = colormaps["Greys"](0.45 + 0.5 * i / max(1, len(references)))
        ax.axhline(ref[column], ls="--", lw=1.2, color=color, label=f"{ref['evaluated']} (unmerged)")
        ax.annotate(ref["evaluated"], xy=(1.0, ref[column]), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom", fontsize=8, color=color)


def _plot_best(table: pd.DataFrame, path: Path) -> bool:
    best = best_points(table)
    if best.empty:
        return False
    references = table[table["evaluated"] != "merged"]
    entries = [(f"{r['series']} (lambda={_fmt(r['lam'])})", r, None) for _, r in best.iterrows()]
    entries += [(f"{r['evaluated']} (unmerged)", r, "//") for _, r in references.iterrows()]
    columns = primary_columns(table) + ["task_score"]
    panels = [[c for c in columns if not _lower_is_better(c)], [c for c in columns if _lower_is_better(c)]]
    panels = [p for p in panels if p]
    fig = new_figure(figsize=(3 + 1.6 * len(columns) + 0.2 * len(entries), 4.8))
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": [len(p) for p in panels]})
    width = 0.8 / len(entries)
    colors = colormaps["tab10"].colors
    for ax, panel in zip(axes[0], panels):
        for i, (label, row, hatch) in enumerate(entries):
            values = [row[c] if pd.notna(row[c]) else 0.0 for c in panel]
            ax.bar([x + (i - (len(entries) - 1) / 2) * width for x in range(len(panel))], values, width,
                   label=label, color="white" if hatch else colors[i % len(colors)],
                   edgecolor="dimgray" if hatch else None, hatch=hatch)
        ax.set_xticks(range(len(panel)), panel, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("lower is better" if _lower_is_better(panel[0]) else "higher is better")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("each method x weighting at its best lambda (highest task_score)", fontsize=10)
    save_figure(fig, path)
    return True


def _plot_tradeoff(table: pd.DataFrame, ppl: str, path: Path) -> bool:
    rows = table.assign(series=series_labels(table))
    rows = rows[rows[ppl].notna() & rows["task_score"].notna()]
    if rows.empty:
        return False
    fig = new_figure(figsize=(7, 4.8))
    ax = fig.subplots()
    merged = rows[rows["evaluated"] == "merged"]
    for series, group in merged.groupby("series", sort=True):
        group = group.sort_values("lam")
        ax.plot(group[ppl], group["task_score"], marker="o", lw=0.8, label=series)
    for _, ref in rows[rows["evaluated"] != "merged"].iterrows():
        ax.scatter(ref[ppl], ref["task_score"], marker="*", s=140, color="black", zorder=3)
        ax.annotate(f"{ref['evaluated']} (unmerged)", (ref[ppl], ref["task_score"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=8)
    if rows[ppl].min() > 0 and rows[ppl].max() / rows[ppl].min() > 10:
        ax.set_xscale("log")
    ax.set_xlabel(f"{ppl} (lower is better)")
    ax.set_ylabel("task_score (higher is better)")
    ax.set_title("task score against perplexity (lines join lambdas)")
    ax.grid(alpha=0.3)
    if not merged.empty:
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


# --------------------------------------------------------------------------- helpers and CLI

def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)


def _fmt(value) -> str:
    if not _present(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
