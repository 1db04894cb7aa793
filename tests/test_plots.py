"""The layer heatmap, drawn in this process or by a child process from layer_analysis.json."""

import json

import pytest

from lata.plots import HeatmapProcess, layer_heatmap

SIMS = {"math": [0.9, 0.5, 0.1], "code": [0.8, 0.4, -0.2]}
WEIGHTS = {"math": [0.0, 0.5, 1.0], "code": [0.0, 0.5, 1.0]}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_child_process_draws_the_same_heatmap_as_this_process(tmp_path):
    (tmp_path / "layer_analysis.json").write_text(json.dumps({"similarities": SIMS, "weights": WEIGHTS}))
    child = HeatmapProcess().draw(tmp_path / "layer_analysis.json", tmp_path / "child.png", "t").wait()
    here = layer_heatmap(SIMS, WEIGHTS, tmp_path / "here.png", title="t")
    # 6 x (1.2 + 0.9 * 2 experts * 2) inches at 120 dpi
    assert _png_size(child) == _png_size(here) == (720, 576)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.png", "here.png", "layer_analysis.json"]


def test_a_failed_drawing_names_the_png_and_the_cause(tmp_path):
    (tmp_path / "layer_analysis.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"(?s)drawing .*layer_analysis.png failed.*JSONDecodeError"):
        HeatmapProcess().draw(tmp_path / "layer_analysis.json", tmp_path / "layer_analysis.png", "t").wait()
    assert not (tmp_path / "layer_analysis.png").exists()


def test_an_unused_drawer_ends_without_drawing(tmp_path):
    drawer = HeatmapProcess()
    drawer.cancel()
    assert drawer._proc.returncode == 0
    drawer.cancel()  # twice is harmless
    assert list(tmp_path.iterdir()) == []


def test_cancel_after_a_request_lets_the_drawing_finish(tmp_path):
    (tmp_path / "layer_analysis.json").write_text(json.dumps({"similarities": SIMS, "weights": WEIGHTS}))
    drawer = HeatmapProcess().draw(tmp_path / "layer_analysis.json", tmp_path / "layer_analysis.png", "t")
    drawer.cancel()
    assert _png_size(tmp_path / "layer_analysis.png") == (720, 576)
