"""Sweeps: reuse within a process and caches (lata.run.caches), launchers, resume after a kill (lata.run.store),
Optuna search, objective (lata.run.objective)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import write_family
import lata.plan as planning
from lata import Family, MergeConfig, WeightingConfig, engine, merge_state_dict, plan_merge
from lata.run import caches, store
from lata.config import ObjectiveConfig
from lata.io.digests import read_checked_json, write_checked_json
from lata.run.fingerprints import checkpoint_digest as fingerprint
from lata.run.objective import objective

LATA = [sys.executable, "-m", "lata"]
POINT = ["zoo=micro", "benchmark.tasks=[zoo_ppl]", "benchmark.limit=2", "progress=false"]


def lata_multirun(args, cache, results, sweep_dir, check=True, **popen):
    env = {**os.environ, "LATA_CACHE": str(cache), "LATA_RESULTS": str(results)}
    cmd = LATA + ["-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


def job_metrics(sweep_dir: Path) -> dict[str, float]:
    """{override string: token perplexity} over a sweep's job directories."""
    out = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        key = " ".join(o for o in overrides if o.startswith(("merge.", "weighting=")))
        out[key] = json.loads((job / "metrics.json").read_text())["zoo_ppl"]["token_perplexity"]
    return out


@pytest.fixture(scope="module")
def basic_sweep(micro_zoo_cache, tmp_path_factory):
    """lam x weighting with the basic launcher: every point in one process."""
    root = tmp_path_factory.mktemp("basic")
    log = lata_multirun(POINT + ["merge.lam=0.5,1.0", "weighting=uniform,linear_rank"], micro_zoo_cache,
                        root / "results", root / "sweep")
    return root, log


def test_basic_sweep_computes_analysis_once_and_reuses_one_model(basic_sweep):
    root, log = basic_sweep
    metrics = job_metrics(root / "sweep")
    assert len(metrics) == 4 and len(set(metrics.values())) == 4  # every point evaluated, all different
    assert log.count("loading ") == 1 and log.count("for evaluation") == 1
    assert log.count("layer analysis computed") + log.count("layer analysis reused") == 1
    assert len(list((root / "results").iterdir())) == 4
    # the report written at the end of the multirun: one row per point, the jobs' numbers
    report = pd.read_csv(root / "sweep" / "results.csv")
    assert len(report) == 4
    by_point = {f"merge.lam={r.lam} weighting={r.weighting}": r["zoo_ppl/token_perplexity"] for _, r in report.iterrows()}
    assert by_point == pytest.approx(metrics, rel=1e-12)
    assert (root / "sweep" / "lambda_zoo_ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_in_place_points_match_a_fresh_process(basic_sweep, micro_zoo_cache, tmp_path):
    """The last point of the sweep ran in a model that held three other merges before it."""
    root, _ = basic_sweep
    lata_multirun(POINT + ["merge.lam=1.0", "weighting=linear_rank"], micro_zoo_cache, tmp_path / "results",
                  tmp_path / "sweep")
    fresh = job_metrics(tmp_path / "sweep")
    assert fresh == {"merge.lam=1.0 weighting=linear_rank": job_metrics(root / "sweep")["merge.lam=1.0 weighting=linear_rank"]}


@pytest.mark.parametrize("launcher", ["joblib", pytest.param("submitit_local", marks=pytest.mark.slow)])  # submitit: also SLURM
def test_parallel_launchers_give_the_basic_launchers_numbers(launcher, basic_sweep, micro_zoo_cache, tmp_path):
    root, _ = basic_sweep
    lata_multirun(POINT + [f"hydra/launcher={launcher}", "merge.lam=0.5,1.0", "weighting=uniform"],
                  micro_zoo_cache, tmp_path / "results", tmp_path / "sweep")
    expected = {k: v for k, v in job_metrics(root / "sweep").items() if "uniform" in k}
    assert job_metrics(tmp_path / "sweep") == pytest.approx(expected, rel=1e-6)


def test_a_killed_sweep_resumes_where_it_stopped(micro_zoo_cache, tmp_path):
    args = POINT + ["merge.lam=0.2,0.4,0.6,0.8"]
    results = tmp_path / "results"
    proc = lata_multirun(args, micro_zoo_cache, results, tmp_path / "killed", start_new_session=True)
    stored = lambda: sorted(p.parent.name for p in results.glob("*/summary.json")  # noqa: E731
                            if not p.parent.name.startswith(".")) if results.is_dir() else []  # not a point being written
    deadline = time.time() + 300
    while time.time() < deadline and not stored():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep: the next point has started
    proc.wait()
    done = stored()
    assert 1 <= len(done) < 4, done
    log = lata_multirun(args, micro_zoo_cache, results, tmp_path / "resumed")
    assert log.count("skipped (resume=false recomputes)") == len(done)
    assert len(job_metrics(tmp_path / "resumed")) == 4 and len(stored()) == 4
    assert not [p for p in results.iterdir() if p.name.startswith(".")]  # no half-written point survives


def test_optuna_search_returns_the_best_trial(micro_zoo_cache, tmp_path):
    env = {**os.environ, "LATA_CACHE": str(micro_zoo_cache), "LATA_RESULTS": str(tmp_path / "results")}
    result = subprocess.run(LATA + ["hparams_search=optuna", "hydra.sweeper.n_trials=3", "zoo=micro",
                                    "benchmark.tasks=[zoo_ppl,zoo_ua]", "benchmark.limit=2", "progress=false",
                                    "objective.tasks=[zoo_ua]", "objective.ppl_ceiling=1e9", f"hydra.sweep.dir={tmp_path / 'search'}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    trials = [json.loads((tmp_path / "search" / str(i) / "summary.json").read_text()) for i in range(3)]
    values = [objective(t["metrics"], ObjectiveConfig(tasks=["zoo_ua"], ppl_ceiling=1e9)) for t in trials]
    assert best["best_value"] == max(values)
    assert set(best["best_params"]) == {"merge.lam", "weighting.drop"}
    assert len({t["merge"]["lam"] for t in trials}) == 3


# --------------------------------------------------------------------------- in-process units

def test_objective_is_the_mean_task_score_under_a_perplexity_ceiling():
    metrics = {"zoo_math": {"exact_match_strict": 0.2}, "zoo_code": {"pass@1": 0.6},
               "zoo_ua": {"compliance": 1.0}, "zoo_ppl": {"token_perplexity": 30.0}}
    assert objective(metrics, ObjectiveConfig()) == pytest.approx(0.4)
    assert objective(metrics, ObjectiveConfig(tasks=["zoo_code"])) == pytest.approx(0.6)
    assert objective(metrics, ObjectiveConfig(ppl_ceiling=40.0)) == pytest.approx(0.4)
    assert objective(metrics, ObjectiveConfig(ppl_ceiling=20.0)) == pytest.approx(-1.5)  # -1 - (30/20 - 1)
    assert objective(metrics, ObjectiveConfig(tasks=["zoo_ua"])) == pytest.approx(1.0)
    assert objective(None, ObjectiveConfig()) is None
    with pytest.raises(ValueError, match="objective.ppl_ceiling"):
        objective({"zoo_math": {"exact_match_strict": 1.0}}, ObjectiveConfig(ppl_ceiling=10.0))


def test_ties_selections_persist_in_the_cache_for_later_processes(tmp_path, monkeypatch):
    dirs = write_family(tmp_path / "family")
    cache = tmp_path / "cache"

    def family():  # a new process's family
        return Family.open(dirs["base"], dirs["instruct"], dirs["experts"])

    def merged(fam, weighting, **merge):
        return merge_state_dict(plan_merge(fam, MergeConfig(method="ties", density=0.3, **merge),
                                           WeightingConfig(name=weighting), progress=False))

    first = family()
    merged(first, "uniform")
    merged(first, "linear_rank", topk_scope="global")
    caches.save_selections(first, cache)
    assert len(first.selections) > 2 and len(list((cache / "selections").glob("*.json"))) == 1

    later = family()
    caches.load_selections(later, cache)
    assert later.selections == first.selections  # keys (tuples of weights too) and values round-trip
    calls = []
    for module, name in ((engine, "kth_largest"), (planning, "global_threshold")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    got = [merged(later, "log_rank", lam=0.6), merged(later, "linear_rank", topk_scope="global", lam=1.2)]
    assert calls == []  # nothing selected again
    monkeypatch.undo()
    expected = [merged(family(), "log_rank", lam=0.6), merged(family(), "linear_rank", topk_scope="global", lam=1.2)]
    for g, e in zip(got, expected):
        assert all(torch.equal(g[name], e[name]) for name in e)
    # a process with new selections adds them to the file; one with none new leaves it alone
    other = family()
    merged(other, "uniform", lam=0.5)  # tensor scope: the same selections as the first process's
    file = next((cache / "selections").glob("*.json"))
    stamp = file.stat().st_mtime_ns
    caches.save_selections(other, cache)
    assert file.stat().st_mtime_ns == stamp
    merged(other, "uniform", topk_scope="global")
    caches.save_selections(other, cache)
    assert len(read_checked_json(file)) == len(first.selections) + 2  # one per expert


def test_an_unusable_cache_file_is_recomputed_not_fatal(tmp_path, caplog):
    dirs = write_family(tmp_path / "family")
    cache = tmp_path / "cache"
    fam = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
    expected = caches.family_analysis(fam, cache, progress=False)
    analysis_file = next((cache / "analysis").glob("*.json"))
    selections_file = cache / "selections" / analysis_file.name
    selections_file.parent.mkdir()
    whole = analysis_file.read_text()
    write_checked_json(tmp_path / "wrong.json", {**read_checked_json(analysis_file), "num_layers": 3})
    wrong_layers = (tmp_path / "wrong.json").read_text()  # whole, with its digest, but another family's
    flipped = whole.replace('"num_layers": 4', '"num_layers": 5')  # one digit changed: the digest disagrees
    assert flipped != whole
    for text in ("{not json", json.dumps({"experts": ["math"]}), whole[: len(whole) // 2], wrong_layers, flipped):
        analysis_file.write_text(text)
        selections_file.write_text(text)
        caches._analyses.clear()
        fresh = Family.open(dirs["base"], dirs["instruct"], dirs["experts"])
        with caplog.at_level("WARNING", logger="lata"):
            assert caches.family_analysis(fresh, cache, progress=False) == expected
            caches.load_selections(fresh, cache)
        assert fresh.selections == {}
        assert f"cache file {analysis_file} ignored" in caplog.text and f"cache file {selections_file} ignored" in caplog.text
        assert read_checked_json(analysis_file)["num_layers"] == 4  # written again, whole
        caplog.clear()


def test_fingerprint_follows_the_content(tmp_path):
    dirs = write_family(tmp_path / "family", experts=("math",))
    math = dirs["experts"]["math"]
    before = fingerprint(math)
    assert fingerprint(math) == before and fingerprint(dirs["instruct"]) != before
    file = next(math.glob("*.safetensors"))
    state = load_file(file)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name] + 1.0  # every block of this tensor changes
    save_file(state, file, metadata={"format": "pt"})
    assert fingerprint(math) != before


def test_point_key_covers_what_changes_the_numbers(tmp_path):
    dirs = write_family(tmp_path / "family", experts=("math",))
    roles = {"base": dirs["base"], "instruct": dirs["instruct"], "math": dirs["experts"]["math"]}
    cfg = OmegaConf.create({"merge": {"method": "ta", "lam": 1.0}, "weighting": {"name": "uniform"},
                            "benchmark": {"name": "zoo", "tasks": ["zoo_ppl"], "limit": 2},
                            "model": {"which": "instruct", "dtype": "auto"}})
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    (heldout / "text.jsonl").write_text('{"text": "a held-out text"}\n')  # zoo_ppl's data
    key = store.point_key(cfg, roles, heldout=heldout)
    changed = [("merge.lam", 0.5), ("weighting.name", "log_rank"), ("benchmark.limit", 3), ("model.dtype", "bfloat16"),
               ("device", "cuda:1")]
    for path, value in changed:
        other = cfg.copy()
        OmegaConf.update(other, path, value, force_add=True)
        assert store.point_key(other, roles, heldout=heldout) != key, path
    renamed = cfg.copy()
    renamed.benchmark.name = "custom"  # the suite's name does not change the numbers
    assert store.point_key(renamed, roles, heldout=heldout) == key
    assert store.point_key(cfg, {**roles, "math": dirs["instruct"]}, heldout=heldout) != key
    (heldout / "text.jsonl").write_text('{"text": "another held-out text"}\n')  # the benchmark's data
    assert store.point_key(cfg, roles, heldout=heldout) != key


def test_every_merge_loads_the_selections_earlier_processes_stored(family_dirs, tmp_path, monkeypatch):
    """Whatever the method: TIES today, any method that selects magnitudes per tensor tomorrow."""
    from hydra import compose, initialize_config_dir

    from conftest import family_args
    from lata.config import config_dir, register_configs
    from lata.run.runner import run

    register_configs()

    def config(method):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=family_args(family_dirs) + [
                f"merge={method}", "progress=false", f"save_model={tmp_path / ('merged-' + method)}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path}"])

    monkeypatch.setattr(caches, "_families", {})  # this test's own open families
    run(config("ties"), tmp_path / "ties")
    stored = next((tmp_path / "cache" / "selections").glob("*.json")).read_text()
    caches._families.clear()  # a new process
    run(config("ta"), tmp_path / "ta")
    (family,) = caches._families.values()
    assert family.selections and len(family.selections) == len(read_checked_json(next((tmp_path / "cache" / "selections").glob("*.json"))))
    assert next((tmp_path / "cache" / "selections").glob("*.json")).read_text() == stored  # nothing new to add


def test_a_failing_point_is_reported_and_the_sweep_goes_on(micro_zoo_cache, tmp_path):
    # weighting=explicit without weights: refused by its job, not when the sweep is composed
    env = {**os.environ, "LATA_CACHE": str(micro_zoo_cache), "LATA_RESULTS": str(tmp_path / "results")}
    sweep = tmp_path / "sweep"
    result = subprocess.run(LATA + ["-m", *POINT, "weighting=explicit,uniform", f"hydra.sweep.dir={sweep}"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 point(s) of the sweep failed" in result.stderr
    line = next(l for l in result.stderr.splitlines() if l.startswith("lata: error in job 0 of the sweep"))
    assert "weighting=explicit)" in line and "needs weighting.weights" in line and "the other points go on" in line
    failed = json.loads((sweep / "0" / "failed.json").read_text())
    assert "weighting=explicit" in failed["overrides"] and "needs weighting.weights" in failed["error"]
    assert (sweep / "1" / "summary.json").is_file() and not (sweep / "0" / "summary.json").exists()
    report = (sweep / "results.md").read_text()
    assert "## Failed points (1: the same command runs them again)" in report
    assert "| 0 | " in report and "ConfigError: weighting=explicit needs weighting.weights" in report
    assert len(pd.read_csv(sweep / "results.csv")) == 1


def test_processes_needing_one_layer_analysis_compute_it_once(tmp_path, monkeypatch):
    """Two workers ask for the same family's analysis at once (as the jobs of a parallel sweep
    do): one computes it while the other waits for the cache's lock, then reads the file."""
    import threading

    d = write_family(tmp_path / "family")
    calls = []

    def slow(family, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other worker to arrive meanwhile
        return real(family, **kwargs)

    real = caches.layer_similarities
    monkeypatch.setattr(caches, "layer_similarities", slow)
    results = []

    def work():
        family = Family.open(d["base"], d["instruct"], d["experts"])
        results.append(caches.family_analysis(family, tmp_path / "cache", progress=False))

    monkeypatch.setattr(caches, "_analyses", {})  # each worker as a fresh process: nothing in memory
    workers = [threading.Thread(target=work) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(calls) == 1 and len(results) == 2
    assert results[0].similarities == results[1].similarities
    files = list((tmp_path / "cache" / "analysis").iterdir())
    assert len(files) == 1 and read_checked_json(files[0])["num_layers"] == 4  # whole; no lock file left
