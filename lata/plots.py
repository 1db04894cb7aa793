"""PNG plots for what a person would rather look at than read.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot's global state (no figure
registry to leak into, and any thread may draw).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lata.atomic import atomic_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def layer_heatmap(similarities: dict[str, list[float]], weights: dict[str, list[float]], path: str | Path,
                  title: str = "LATA layer analysis") -> Path:
    """Two aligned heatmaps (experts x layers): similarity s_{l,k} above, weight w_{l,k} below."""
    experts = list(similarities)
    num_layers = len(next(iter(similarities.values())))
    width = max(6.0, 0.45 * num_layers + 2.5)
    height = 1.2 + 0.9 * len(experts) * 2
    fig = new_figure(figsize=(width, height))
    axes = fig.subplots(2, 1, sharex=True)
    panels = [("cosine(tau_comp, tau_instr)", similarities, "RdBu_r", (-1, 1)),
              ("layer weight w", weights, "viridis", (0, max(1.0, max(max(w) for w in weights.values()))))]
    for ax, (label, data, cmap, (vmin, vmax)) in zip(axes, panels):
        matrix = [data[k] for k in experts]
        image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(experts)), experts)
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03)
        if num_layers <= 40:
            for i, row in enumerate(matrix):
                for l, value in enumerate(row):
                    ax.text(l, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if (value < 0.5 * vmax if cmap == "viridis" else abs(value) > 0.6)
                            else "black")
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(range(num_layers))
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    save_figure(fig, path)
    return path


def new_figure(**kwargs) -> "Figure":
    """A figure outside pyplot (no global state: safe on any thread), laid out with constraints."""
    from matplotlib.figure import Figure  # imported on first use: a merge that draws nothing never loads it

    return Figure(layout="constrained", **kwargs)


def save_figure(fig: "Figure", path: Path) -> None:
    """savefig to a temporary sibling, then rename: a reader never sees half a PNG."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)


class HeatmapProcess:
    """The layer heatmap of a ``layer_analysis.json``, drawn by a child process (``python -m
    lata.plots``) so that a merge can run meanwhile.

    Decision: the child starts before there is anything to draw and loads matplotlib at once
    (the CLI starts it before it imports torch, so both loads run side by side); ``draw`` sends
    it the request, ``wait`` returns the PNG or raises, naming it, if the drawing failed, and
    ``cancel`` ends a child that will draw nothing.
    """

    def __init__(self):
        self.path: Path | None = None
        self._proc = subprocess.Popen([sys.executable, "-m", "lata.plots"], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def draw(self, analysis_json: Path, path: Path, title: str) -> "HeatmapProcess":
        self.path = Path(path)
        self._close_stdin(json.dumps({"analysis": str(analysis_json), "png": str(path), "title": title}))
        return self

    def wait(self) -> Path:
        if self._finish() != 0:
            raise RuntimeError(f"drawing {self.path} failed:\n{self._err.strip()}")
        return self.path

    def cancel(self) -> None:
        """End the child: unused, it exits; sent a drawing, it finishes it first."""
        self._finish()

    def _finish(self) -> int:
        if self._proc.returncode is None:
            self._close_stdin()
            self._err = self._proc.stderr.read()
            self._proc.stderr.close()
            self._proc.wait()
        return self._proc.returncode

    def _close_stdin(self, request: str = "") -> None:
        if self._proc.stdin.closed:
            return
        try:
            self._proc.stdin.write(request)
            self._proc.stdin.close()
        except BrokenPipeError:  # the child is gone; wait() says why
            pass


def main(argv: list[str] | None = None) -> None:
    """``python -m lata.plots ANALYSIS_JSON PNG TITLE`` draws one heatmap; with no arguments,
    load matplotlib, then draw the request read from stdin (none: exit)."""
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        new_figure()  # the imports, before the request comes
        import matplotlib.backends.backend_agg  # noqa: F401  (what savefig to PNG loads)
        request = sys.stdin.read()
        if not request:
            return
        args = [(r := json.loads(request))["analysis"], r["png"], r["title"]]
    analysis_json, path, title = args
    data = json.loads(Path(analysis_json).read_text())
    layer_heatmap(data["similarities"], data["weights"], path, title=title)


if __name__ == "__main__":
    main()
