"""Sweeps on a real SLURM cluster through ``hydra/launcher=submitit_slurm``, on the micro zoo.

Run by ``make test-slurm`` (tests/slurm/cluster.sh starts a one-node cluster and sets
SLURM_CONF and LATA_SLURM_PARTITION); anywhere else these tests fail at once, saying so.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import family_args, write_family
from lata.io.digests import read_checked_json
from test_sweep import POINT, job_metrics, lata_multirun

pytestmark = pytest.mark.slurm

PARTITION = os.environ.get("LATA_SLURM_PARTITION")
SLURM = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.timeout_min=15",
         "hydra.launcher.cpus_per_task=1"]
SWEEP = ["merge.lam=0.5,1.0", "weighting=uniform,linear_rank"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not PARTITION or not os.environ.get("SLURM_CONF"):
        pytest.fail("these tests need a SLURM cluster: run them with `make test-slurm`")
    nodes = subprocess.run(["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True)
    assert nodes.returncode == 0 and "idle" in nodes.stdout.split(), nodes.stdout + nodes.stderr


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]


def test_a_sweep_runs_as_slurm_jobs_with_the_basic_launchers_numbers(micro_zoo_cache, tmp_path):
    basic = tmp_path / "basic"
    lata_multirun(POINT + SWEEP, micro_zoo_cache, tmp_path / "results-basic", basic)
    sweep = tmp_path / "slurm"
    lata_multirun(POINT + SWEEP + SLURM, micro_zoo_cache, tmp_path / "results", sweep)
    done = summaries(sweep)
    assert len(done) == 4
    ids = {s["slurm"]["job_id"] for s in done}
    assert len(ids) == 4 and all(i.isdigit() for i in ids)  # four SLURM jobs (one array)
    assert {s["slurm"]["job_partition"] for s in done} == {PARTITION}
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert any(f"running as SLURM job {i}" in p.read_text() for p in logs for i in ids)
    assert job_metrics(sweep) == pytest.approx(job_metrics(basic), rel=1e-6)
    report = pd.read_csv(sweep / "results.csv")
    assert len(report) == 4
    expected = pd.read_csv(basic / "results.csv").sort_values(["weighting", "lam"]).reset_index(drop=True)
    got = report.sort_values(["weighting", "lam"]).reset_index(drop=True)
    assert got["zoo_ppl/token_perplexity"].tolist() == pytest.approx(expected["zoo_ppl/token_perplexity"].tolist(),
                                                                      rel=1e-6)


def test_two_jobs_share_one_layer_analysis_in_the_disk_cache(tmp_path):
    # a family whose pass 1 takes a few seconds, so that the two jobs meet there
    d = write_family(tmp_path / "family", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                     vocab_size=32000, num_attention_heads=4, num_key_value_heads=2)
    sweep = tmp_path / "sweep"
    args = family_args(d) + ["merge.lam=0.5,1.0", "progress=false"] + SLURM
    lata_multirun(args, tmp_path / "cache", tmp_path / "results", sweep)
    text = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert text.count("layer analysis computed and cached") == 1, text[-3000:]
    assert text.count("layer analysis reused from") == 1
    files = list((tmp_path / "cache" / "analysis").iterdir())
    assert len(files) == 1 and read_checked_json(files[0])["num_layers"] == 8  # whole; no lock left
    assert len(summaries(sweep)) == 2


def test_a_cancelled_job_is_the_only_one_run_again(micro_zoo_cache, tmp_path):
    # points of a few seconds, two at a time whatever the node's cores: two start after a point is stored
    args = [*POINT, "benchmark.limit=8", "merge.lam=0.2,0.4,0.6,0.8", "hydra.launcher.array_parallelism=2"] + SLURM
    results = tmp_path / "results"
    stored = lambda: sorted(p for p in results.glob("*/summary.json")  # noqa: E731
                            if not p.parent.name.startswith(".")) if results.is_dir() else []  # not one being written
    proc = lata_multirun(args, micro_zoo_cache, results, tmp_path / "first", start_new_session=True)
    deadline, cancelled, early = time.time() + 400, None, None
    while time.time() < deadline and cancelled is None:
        # a running job whose point started after another point was stored: one that started
        # beside the stored point's job would be about to finish too (it had the same work)
        # (job id, its name in the array: what squeue shows and scancel takes)
        running = [line.split() for line in subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%A %i"],
                                                           capture_output=True, text=True).stdout.splitlines()]
        logs = "\n".join(p.read_text() for p in (tmp_path / "first").rglob("*_log.out"))
        started = {job for job, _ in running if f"running as SLURM job {job} " in logs}
        if early is None and stored():
            early = started
        working = [name for job, name in running if early is not None and job in started - early]
        if working:
            cancelled = working[0]
            # SIGKILL at once: a plain scancel sends SIGTERM, which submitit's job ignores, and a
            # point with less than KillWait seconds left would then finish as if never cancelled
            subprocess.run(["scancel", "--signal=KILL", "--full", cancelled], check=True)
        time.sleep(0.1)
    assert cancelled is not None, "no point was under way after another one finished"
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode != 0, output[-2000:]  # the launcher reports the cancelled job...
    deadline = time.time() + 300  # ...while the sweep's other jobs finish on the cluster
    while time.time() < deadline and subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    done = len(stored())
    assert done == 3, (done, output[-2000:])  # every point but the cancelled one
    lata_multirun(args, micro_zoo_cache, results, tmp_path / "again")
    logs = "\n".join(p.read_text() for p in (tmp_path / "again" / ".submitit").rglob("*_log.*"))
    assert logs.count("running as SLURM job") == 4  # the jobs' own logs
    assert logs.count("skipped (resume=false recomputes)") == 3 and len(stored()) == 4  # one point ran


def test_a_failing_point_is_reported_and_the_others_finish(micro_zoo_cache, tmp_path):
    # weighting=explicit without weights: refused by the job that gets it, not at composition
    args = POINT + ["merge.lam=0.5", "weighting=uniform,explicit,linear_rank"] + SLURM
    output = lata_multirun(args, micro_zoo_cache, tmp_path / "results", tmp_path / "sweep", check=False)
    assert "point(s) of the sweep failed" in output
    done = summaries(tmp_path / "sweep")
    assert sorted(s["weighting"]["name"] for s in done) == ["linear_rank", "uniform"]
    failed = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/failed.json")]
    assert len(failed) == 1 and "weighting=explicit needs weighting.weights" in failed[0]["error"]
    assert failed[0]["slurm_job_id"].isdigit()
    report = (tmp_path / "sweep" / "results.md").read_text()
    assert "## Failed points (1" in report and "weighting=explicit needs weighting.weights" in report
