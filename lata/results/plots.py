"""PNG plots for what a person would rather look at than read: a merge's layer heatmap, the
report's figures of a results table (``lata.results.tables``) and the experiments' figures.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot's global state (no figure
registry to leak into, and any thread may draw). matplotlib and the results tables are imported
on first use: the heatmap's drawing process (``python -m lata.results.plots``) loads neither
pandas nor the method registries.
"""

from __future__ import annotations

import atexit
import json
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from lata.io.atomic import atomic_file

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def layer_heatmap(similarities: dict[str, list[float]], weights: dict[str, list[float]], path: str | Path,
                  title: str = "LATA layer analysis", beside: dict[str, dict[str, list[float]]] | None = None) -> Path:
    """Aligned heatmaps (experts x layers): similarity s_{l,k} above, weight w_{l,k} below, and
    each of ``beside`` ({label: weights}, e.g. LATA's next to learned ones) under them.

    The similarity colours span the data's own range (named in the panel's title), so a ranking
    among close values (0.96 against 0.98) shows; the values are printed to three decimals."""
    experts = list(similarities)
    num_layers = len(next(iter(similarities.values())))
    beside = beside or {}
    width = max(6.0, 0.45 * num_layers + 2.5)
    height = 1.2 + 0.9 * len(experts) * (2 + len(beside))
    fig = new_figure(figsize=(width, height))
    axes = fig.subplots(2 + len(beside), 1, sharex=True)
    lo, hi = similarity_scale(similarities)
    top = max(1.0, *(max(w) for ws in [weights, *beside.values()] for w in ws.values()))
    panels = [(f"cosine(tau_comp, tau_instr): colours span {lo:.3f} to {hi:.3f}", similarities, "cividis", (lo, hi),
               "{:.3f}"),
              ("layer weight w", weights, "viridis", (0, top), "{:.2f}"),
              *((f"layer weight w of {label}", w, "viridis", (0, top), "{:.2f}") for label, w in beside.items())]
    for ax, (label, data, cmap, (vmin, vmax), shown) in zip(axes, panels):
        matrix = [data[k] for k in experts]
        image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(experts)), experts)
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03)
        if num_layers <= 40:
            for i, row in enumerate(matrix):
                for l, value in enumerate(row):
                    dark = value < vmin + 0.5 * (vmax - vmin)  # both maps run dark to light
                    ax.text(l, i, shown.format(value), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(range(num_layers))
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    save_figure(fig, path)
    return path


def similarity_scale(similarities: dict[str, list[float]]) -> tuple[float, float]:
    """The colour range of the similarity panel: the data's own (widened by 0.01 where flat)."""
    values = [v for row in similarities.values() for v in row]
    lo, hi = min(values), max(values)
    return (lo, hi) if hi > lo else (lo - 0.01, hi + 0.01)


def new_figure(**kwargs) -> "Figure":
    """A figure outside pyplot (no global state: safe on any thread), laid out with constraints."""
    from matplotlib.figure import Figure  # imported on first use: a merge that draws nothing never loads it

    return Figure(layout="constrained", **kwargs)


def save_figure(fig: "Figure", path: Path) -> None:
    """savefig to a temporary sibling, then rename: a reader never sees half a PNG."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)


# --------------------------------------------------------------------------- the report's figures
# Each takes a results table (lata.results.tables.collect) and returns whether it drew: a figure
# without its data (one lambda per line, no score, no perplexity) is not written.

def lambda_plot(table: "pd.DataFrame", column: str, path: Path) -> bool:
    """``column`` against lambda, one line per series; unmerged models as dashed levels."""
    from lata.results.tables import lower_is_better, series_labels

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
    ax.set_ylabel(column + (" (lower is better)" if lower_is_better(column) else ""))
    ax.set_title(f"{column} against lambda")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _reference_lines(ax, rows: "pd.DataFrame", column: str) -> None:
    from matplotlib import colormaps

    references = rows[(rows["evaluated"] != "merged") & rows[column].notna()]
    for i, (_, ref) in enumerate(references.iterrows()):
        color = colormaps["Greys"](0.45 + 0.5 * i / max(1, len(references)))
        ax.axhline(ref[column], ls="--", lw=1.2, color=color, label=f"{ref['evaluated']} (unmerged)")
        ax.annotate(ref["evaluated"], xy=(1.0, ref[column]), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2), textcoords="offset points", ha="right", va="bottom", fontsize=8, color=color)


def best_lambda_plot(table: "pd.DataFrame", path: Path) -> bool:
    """Every series at its best lambda (``best_points``) and every unmerged model (hatched):
    grouped bars of the primary metrics and task_score, higher-is-better and lower-is-better
    metrics in panels of their own."""
    import pandas as pd
    from matplotlib import colormaps

    from lata.results.tables import best_points, fmt, lower_is_better, primary_columns

    best = best_points(table)
    if best.empty:
        return False
    references = table[table["evaluated"] != "merged"]
    entries = [(f"{r['series']} (lambda={fmt(r['lam'])})", r, None) for _, r in best.iterrows()]
    entries += [(f"{r['evaluated']} (unmerged)", r, "//") for _, r in references.iterrows()]
    columns = primary_columns(table) + ["task_score"]
    panels = [[c for c in columns if not lower_is_better(c)], [c for c in columns if lower_is_better(c)]]
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
        ax.set_ylabel("lower is better" if lower_is_better(panel[0]) else "higher is better")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("each method x weighting at its best lambda (highest task_score)", fontsize=10)
    save_figure(fig, path)
    return True


def tradeoff_plot(table: "pd.DataFrame", ppl: str, path: Path) -> bool:
    """task_score against the ``ppl`` column, one point per run, lines joining a series' lambdas;
    unmerged models as stars."""
    from lata.results.tables import series_labels

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


# --------------------------------------------------------------------------- the experiments' figures
# Tables of merged points with method, weighting, lam and task_score columns; the metric
# columns they draw are named by the caller.

#: the order of weightings in grouped bars (the plain method first)
WEIGHTING_ORDER = ("uniform", "threshold", "linear_rank", "log_rank", "lines", "shuffled")


def best_score_bars(best: "pd.DataFrame", title: str, path: Path) -> None:
    """The task score at the best lambda: one group of bars per method, a bar per weighting."""
    methods = sorted(best["method"].unique())
    weightings = [w for w in WEIGHTING_ORDER if w in set(best["weighting"])]
    fig = new_figure(figsize=(max(9.0, 0.8 * len(methods) + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(weightings)
    for j, w in enumerate(weightings):
        values = [best[(best.method == m) & (best.weighting == w)]["task_score"].max() for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], values, width, label=w)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("task score at the best lambda")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=3)
    save_figure(fig, path)


def forgetting_bars(forgetting: "pd.DataFrame", references: "pd.DataFrame", skills: dict[str, str],
                    path: Path) -> None:
    """Per expert set and weighting, the expert's target ability (``skills[experts]``: its
    metric column) unmerged and after Task Arithmetic at lambda -1."""
    fig = new_figure(figsize=(8, 4))
    ax = fig.add_subplot()
    labels, before, after = [], [], []
    for experts, group in forgetting.groupby("experts"):
        skill = skills[experts]
        for weighting in ("uniform", "threshold", "linear_rank", "lines"):
            row = group[(group.method == "ta") & (group.weighting == weighting) & (group.lam == -1.0)]
            if len(row):
                labels.append(f"{experts}\n{weighting}")
                before.append(references[references.evaluated == experts].iloc[0][skill])
                after.append(row.iloc[0][skill])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], before, 0.4, label="expert, before")
    ax.bar([x + 0.2 for x in xs], after, 0.4, label="TA, lambda -1")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("target ability (ua compliance / math)")
    ax.legend()
    save_figure(fig, path)


def score_vs_perplexity(table: "pd.DataFrame", ppl: str, path: Path) -> None:
    """Task score against the ``ppl`` column, one marker per weighting (uniform: plain methods)."""
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for weighting, group in table.groupby("weighting"):
        ax.scatter(group[ppl], group["task_score"], label=weighting, s=18)
    ax.set_xlabel("token perplexity (lower: more utility kept)")
    ax.set_ylabel("task score")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def score_and_perplexity_vs_lambda(table: "pd.DataFrame", ppl: str, path: Path) -> None:
    """Two panels against lambda, one line per weighting: task score (left), ``ppl`` (right)."""
    fig = new_figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    for weighting, group in table.groupby("weighting"):
        group = group.sort_values("lam")
        left.plot(group["lam"], group["task_score"], marker="o", label=weighting)
        right.plot(group["lam"], group[ppl], marker="o", label=weighting)
    left.set_xlabel("lambda")
    left.set_ylabel("task score")
    right.set_xlabel("lambda")
    right.set_ylabel("token perplexity")
    left.legend()
    save_figure(fig, path)


class HeatmapProcess:
    """Layer heatmaps of ``layer_analysis.json`` files, drawn by a child process (``python -m
    lata.results.plots``) so that a merge can run meanwhile.

    Decision: the child starts before there is anything to draw and loads matplotlib at once
    (the CLI starts it before it imports torch, so both loads run side by side). It then draws
    one request after another: ``shared()`` is one drawer for every job of a process, so the
    points of a multirun load matplotlib once, not once a point. ``draw``
    sends a request, ``wait`` returns its PNG or raises, naming it, if that drawing failed (the
    child goes on), ``finish`` waits for a request that nobody waited for, and ``close`` ends
    the child (at exit for the shared one).
    """

    _shared: "HeatmapProcess | None" = None

    def __init__(self):
        self._errors = tempfile.TemporaryFile(mode="w+")  # the child's stderr, read if it dies
        self._proc = subprocess.Popen([sys.executable, "-m", "lata.results.plots"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._errors, text=True)
        self._pending: Path | None = None

    @classmethod
    def shared(cls) -> "HeatmapProcess":
        """This process's drawer, started on first use (and again if it has ended)."""
        if cls._shared is None or cls._shared._proc.poll() is not None:
            cls._shared = cls()
            atexit.register(cls._shared.close)
        return cls._shared

    def draw(self, analysis_json: Path, path: Path, title: str) -> "HeatmapProcess":
        self.finish()  # one request at a time
        self._pending = Path(path)
        request = json.dumps({"analysis": str(analysis_json), "png": str(path), "title": title})
        try:
            self._proc.stdin.write(request + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the child is gone; wait() says why
            pass
        return self

    def wait(self) -> Path:
        path, self._pending = self._pending, None
        if path is None:
            raise RuntimeError("no drawing was requested")
        reply = self._proc.stdout.readline()
        error = json.loads(reply).get("error") if reply else self._child_error()
        if error:
            raise RuntimeError(f"drawing {path} failed:\n{error.strip()}")
        return path

    def finish(self) -> None:
        """Wait for a request nobody waited for (a failed drawing is let go: its job has ended)."""
        if self._pending is not None:
            try:
                self.wait()
            except RuntimeError:
                pass

    def close(self) -> None:
        """End the child, after the drawing it was asked for."""
        self.finish()
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait()
        self._proc.stdout.close()
        self._errors.close()

    def _child_error(self) -> str:
        self._proc.wait()
        self._errors.seek(0)
        return self._errors.read()[-4000:] or f"the drawing process ended with code {self._proc.returncode}"


def main(argv: list[str] | None = None) -> None:
    """``python -m lata.results.plots ANALYSIS_JSON PNG TITLE`` draws one heatmap; with no arguments,
    load matplotlib, then draw each request read from stdin (a JSON line) and reply on stdout
    ``{}`` or ``{"error": traceback}``, until stdin ends."""
    # SIGTERM (a job killed with its process group) unwinds like Ctrl-C: a PNG being written is
    # removed with its temporary file (lata.io.atomic), never left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = argv if argv is not None else sys.argv[1:]
    if args:
        _draw(*args)
        return
    new_figure()  # the imports, before the first request comes
    import matplotlib.backends.backend_agg  # noqa: F401  (what savefig to PNG loads)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            _draw(request["analysis"], request["png"], request["title"])
            reply = {}
        except Exception:
            reply = {"error": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


def _draw(analysis_json: str, path: str, title: str) -> None:
    data = json.loads(Path(analysis_json).read_text())
    layer_heatmap(data["similarities"], data["weights"], path, title=title, beside=data.get("beside"))


if __name__ == "__main__":
    main()
