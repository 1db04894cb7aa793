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
    """The layer heatmap of a ``layer_analysis.json`` drawn by a child process (``python -m
    lata.plots``), so a merge can run meanwhile; ``wait()`` raises if the drawing failed."""

    def __init__(self, analysis_json: Path, path: Path, title: str):
        self.path = Path(path)
        self._proc = subprocess.Popen([sys.executable, "-m", "lata.plots", str(analysis_json), str(path), title],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(self) -> Path:
        _, err = self._proc.communicate()
        if self._proc.returncode != 0:
            raise RuntimeError(f"drawing {self.path} failed:\n{err.strip()}")
        return self.path


def main(argv: list[str] | None = None) -> None:
    analysis_json, path, title = argv if argv is not None else sys.argv[1:]
    data = json.loads(Path(analysis_json).read_text())
    layer_heatmap(data["similarities"], data["weights"], path, title=title)


if __name__ == "__main__":
    main()
