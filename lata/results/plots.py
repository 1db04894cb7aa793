"""PNG plots for what a person would rather look at than read.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot's global state (no figure
registry to leak into, and any thread may draw).
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
    """Layer heatmaps of ``layer_analysis.json`` files, drawn by a child process (``python -m
    lata.results.plots``) so that a merge can run meanwhile.

    Decision: the child starts before there is anything to draw and loads matplotlib at once
    (the CLI starts it before it imports torch, so both loads run side by side). It then draws
    one request after another: ``shared()`` is one drawer for every job of a process, so the
    points of a multirun load matplotlib once (about 1.2 s of CPU a point otherwise). ``draw``
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
    layer_heatmap(data["similarities"], data["weights"], path, title=title)


if __name__ == "__main__":
    main()
