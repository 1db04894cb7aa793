"""lata.results.logger: a real offline W&B run read back from its transaction log; failures never raise."""

import json
import logging
import struct
import sys
import time
import types
from pathlib import Path

import pytest

from lata.config import ConfigError, LoggerConfig, validate_logger
from lata.results.logger import log_job, resolve_mode
from lata.results.plots import layer_heatmap

METRICS = {"zoo_math": {"exact_match_strict": 0.25, "exact_match_flexible": 0.375, "samples": 40.0},
           "zoo_code": {"pass@1": 0.125, "samples": 40.0},
           "zoo_ppl": {"token_perplexity": 12.5, "samples": 5.0}}
SIMS = {"math": [0.5, 0.25], "code": [0.75, 0.125]}
WEIGHTS = {"math": [0.0, 1.0], "code": [1.0, 0.0]}


@pytest.fixture
def no_key(tmp_path, monkeypatch):
    """No W&B credentials; W&B's own files go under tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def job(tmp_path):
    run_dir = tmp_path / "sweep" / "3"
    run_dir.mkdir(parents=True)
    (run_dir / "layer_analysis.json").write_text(json.dumps(
        {"experts": ["math", "code"], "num_layers": 2, "similarities": SIMS, "weights": WEIGHTS}))
    layer_heatmap(SIMS, WEIGHTS, run_dir / "layer_analysis.png")
    summary = {"merge": {"method": "ties", "lam": 0.5, "lams": {}, "density": 0.2, "p": 0.9},
               "weighting": {"name": "log_rank", "drop": 0.5}, "run_dir": str(run_dir), "metrics": METRICS}
    config = {"merge": summary["merge"], "weighting": summary["weighting"], "benchmark": {"name": "zoo"}}
    return run_dir, summary, config


def read_records(wandb_file: Path) -> list:
    """The records of a .wandb transaction log (W&B's LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, block, chunk, records = wandb_file.read_bytes(), 7, 32768, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(raw):  # the end, or a record still being written
            break
        chunk += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def finished_records(wandb_file: Path, timeout_s: float = 30.0) -> list:
    """The records once the run's exit is written: W&B's core process writes the log shortly
    after ``finish`` returns (and before the Python process exits)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(wandb_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_offline_run_records_metrics_group_config_and_tables(tmp_path, no_key, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, summary, config = job(tmp_path)
    log_job(LoggerConfig(name="wandb", tags=["t1"]), run_dir=run_dir, config=config, summary=summary,
            group="2026-01-01/12-00-00")
    out = capfd.readouterr()
    assert "wandb" not in out.out.lower() and "wandb" not in out.err.lower()  # quiet
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = finished_records(next(offline[0].glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "2026-01-01/12-00-00" and run.project == "lata" and list(run.tags) == ["t1"]
    assert run.display_name == "ties+log_rank lam=0.5 density=0.2 drop=0.5"  # method keys, then weighting keys
    logged_config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert logged_config["merge"] == summary["merge"] and logged_config["benchmark"] == {"name": "zoo"}
    scalars = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update if u.key}
    expected = {f"{t}/{m}": v for t, values in METRICS.items() for m, v in values.items()}
    expected["task_score"] = (0.25 + 0.125) / 2
    assert {k: scalars[k] for k in expected} == expected
    history = {tuple(i.nested_key) or (i.key,) for r in records if r.WhichOneof("record_type") == "history"
               for i in r.history.item}
    assert {("results", "_type"), ("layer_analysis/table", "_type"), ("layer_analysis/heatmap", "_type")} <= history
    media = offline[0] / "files" / "media"
    table = json.loads(next(media.glob("table/layer_analysis/table_*.table.json")).read_text())
    assert table["columns"] == ["expert", "layer", "similarity", "weight"]
    assert table["data"] == [[e, l, SIMS[e][l], WEIGHTS[e][l]] for e in ("math", "code") for l in (0, 1)]
    results = json.loads(next(media.glob("table/results_*.table.json")).read_text())
    row = dict(zip(results["columns"], results["data"][0]))
    assert row["run"] == "3" and row["method"] == "ties" and row["zoo_code/pass@1"] == 0.125
    assert next(media.glob("images/layer_analysis/heatmap_*.png")).read_bytes()[:4] == b"\x89PNG"


def test_failing_wandb_init_warns_and_returns(tmp_path, no_key, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken_init)
    run_dir, summary, config = job(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lata"):
        log_job(LoggerConfig(name="wandb", mode="offline"), run_dir=run_dir, config=config, summary=summary)
    assert "W&B logging failed (RuntimeError: no service)" in caplog.text


def test_failure_after_init_still_finishes_the_run(tmp_path, no_key, monkeypatch, caplog):
    finished = []

    class Run:
        summary = {}

        def log(self, data):
            raise OSError("disk full")

        def finish(self):
            finished.append(True)

    fake = types.SimpleNamespace(init=lambda **kwargs: Run(), Settings=dict, Table=lambda **kw: kw,
                                 Image=lambda *a, **kw: a)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir, summary, config = job(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lata"):
        log_job(LoggerConfig(name="wandb", mode="offline"), run_dir=run_dir, config=config, summary=summary)
    assert finished == [True] and "disk full" in caplog.text


def test_missing_wandb_warns(tmp_path, no_key, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run_dir, summary, config = job(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lata"):
        log_job(LoggerConfig(name="wandb"), run_dir=run_dir, config=config, summary=summary)
    assert "wandb is not installed" in caplog.text


def test_logger_none_writes_nothing(tmp_path):
    run_dir, summary, config = job(tmp_path)
    before = sorted(p.name for p in run_dir.iterdir())
    log_job(LoggerConfig(), run_dir=run_dir, config=config, summary=summary, group="g")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_mode_auto_is_online_only_with_a_key(tmp_path, no_key, monkeypatch, caplog):
    assert resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B's own switch wins over auto
    assert resolve_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    with caplog.at_level(logging.WARNING, logger="lata"):
        assert resolve_mode("online") == "offline"  # never a login prompt
    assert "no W&B API key" in caplog.text
    assert resolve_mode("disabled") == "disabled"


def test_validate_logger():
    validate_logger(LoggerConfig(name="wandb", mode="offline"))
    with pytest.raises(ConfigError, match="logger.name='tensorboard'"):
        validate_logger(LoggerConfig(name="tensorboard"))
    with pytest.raises(ConfigError, match="logger.mode='sometimes'"):
        validate_logger(LoggerConfig(name="wandb", mode="sometimes"))
