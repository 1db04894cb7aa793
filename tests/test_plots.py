"""The layer heatmap, drawn in this process or by a child process from layer_analysis.json."""

import json

import pytest

from lata.results.plots import HeatmapProcess, layer_heatmap, similarity_scale

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


def test_one_child_draws_request_after_request_and_survives_a_failed_one(tmp_path):
    good = tmp_path / "layer_analysis.json"
    good.write_text(json.dumps({"similarities": SIMS, "weights": WEIGHTS}))
    (tmp_path / "bad.json").write_text("{not json")
    drawer = HeatmapProcess()
    pid = drawer._proc.pid
    assert _png_size(drawer.draw(good, tmp_path / "a.png", "a").wait()) == (720, 576)
    with pytest.raises(RuntimeError, match=r"(?s)drawing .*b.png failed.*JSONDecodeError"):
        drawer.draw(tmp_path / "bad.json", tmp_path / "b.png", "b").wait()
    drawer.draw(good, tmp_path / "c.png", "c")  # never waited for: the next request waits first
    assert _png_size(drawer.draw(good, tmp_path / "d.png", "d").wait()) == (720, 576)
    assert _png_size(tmp_path / "c.png") == (720, 576) and drawer._proc.pid == pid
    drawer.close()
    assert drawer._proc.returncode == 0
    drawer.close()  # twice is harmless


def test_an_unused_drawer_ends_without_drawing(tmp_path):
    drawer = HeatmapProcess()
    drawer.close()
    assert drawer._proc.returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_close_after_a_request_lets_the_drawing_finish(tmp_path):
    (tmp_path / "layer_analysis.json").write_text(json.dumps({"similarities": SIMS, "weights": WEIGHTS}))
    drawer = HeatmapProcess().draw(tmp_path / "layer_analysis.json", tmp_path / "layer_analysis.png", "t")
    drawer.close()
    assert _png_size(tmp_path / "layer_analysis.png") == (720, 576)


def test_the_shared_drawer_is_one_per_process_and_restarts_if_it_ended():
    first = HeatmapProcess.shared()
    assert HeatmapProcess.shared() is first
    first.close()
    assert HeatmapProcess.shared() is not first and HeatmapProcess.shared()._proc.poll() is None


def test_a_drawer_that_dies_is_reported_with_its_exit(tmp_path):
    drawer = HeatmapProcess()
    drawer._proc.kill()
    drawer._proc.wait()
    with pytest.raises(RuntimeError, match="drawing .*x.png failed"):
        drawer.draw(tmp_path / "layer_analysis.json", tmp_path / "x.png", "t").wait()


def test_the_similarity_colours_span_the_datas_range():
    """0.96 and 0.98 get the two ends of the colour map, not nearly the same colour of a -1..1 scale."""
    assert similarity_scale({"a": [0.96, 0.97], "b": [0.98, 0.965]}) == (0.96, 0.98)
    assert similarity_scale(SIMS) == (-0.2, 0.9)
    assert similarity_scale({"a": [0.5, 0.5]}) == (0.49, 0.51)
