"""conf/experiment/: every experiment composes, names its command, and every point of its sweep
validates; the experiments that make reproduce runs are the ones experiments/summarize.py reads;
the real families refuse an unreachable hub clearly; one experiment runs end to end on the micro zoo."""

import functools
import importlib.util
import itertools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import run_lata
from lata.cli import config_dir
from lata.config import register_configs, validate

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
REAL = [e for e in EXPERIMENTS if e.startswith(("paper_", "mergebench_"))]
ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ["++model.experts.math=someone/math-expert", "++model.experts.code=someone/code-expert"]


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield


def sweep_grid(name: str) -> list[list[str]]:
    """Per swept key, its overrides (``key=value`` for each value) of an experiment's sweep."""
    cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params or {})
    return [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]


def sweep_points(name: str) -> list[list[str]]:
    """Points that together take every value of every swept key: the first point, then each other
    value of each key with the first values of the rest (one empty point for a single run).
    Validation is per key, so this covers what the full product would."""
    grid = sweep_grid(name)
    first = [values[0] for values in grid]
    return [first] + [first[:i] + [value] + first[i + 1:] for i, values in enumerate(grid) for value in values[1:]]


@functools.cache
def summarized() -> dict[str, str]:
    """experiments/summarize.py's experiments: {name: the command its section names}."""
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "experiments" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.COMMANDS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_names_its_command(name):
    text = (Path(config_dir()) / "experiment" / f"{name}.yaml").read_text()
    assert re.search(rf"^#\s+lata experiment={name}(\s|$)", text, re.MULTILINE), name


def test_the_summarized_experiments_are_the_reproduced_ones_and_each_has_its_command():
    """make reproduce runs what summarize.py reads; each is a config whose sweep writes where
    summarize.py looks, and experiments/README.md gives its command."""
    commands = summarized()
    reproduced = re.search(r"^EXPERIMENTS \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).split()
    readme = (ROOT / "experiments" / "README.md").read_text()
    assert commands and list(commands) == reproduced
    for name, command in commands.items():
        assert name in EXPERIMENTS and name not in REAL
        assert command == f"lata experiment={name}" and f"`{command}`" in readme
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and Path(cfg.hydra.sweep.dir).parts[-2:] == ("experiments", name)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_point_of_every_experiment_validates(name):
    points = sweep_points(name)
    assert points
    for point in points:
        cfg = compose(config_name="config", overrides=[f"experiment={name}", *point, *(EXPERTS if name in REAL else [])])
        validate(cfg)
        if name in REAL:
            suite = "mergebench" if name.startswith("mergebench_") else "paper"
            assert cfg.device == "cuda" and cfg.model.dtype == "bfloat16" and cfg.benchmark.name == suite
            assert "/" in cfg.model.base and "/" in cfg.model.instruct  # hub ids
        else:
            assert cfg.model.embedded == "zoo" and cfg.benchmark.name == "zoo"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_has_points_and_no_value_twice(name):
    grid = sweep_grid(name)
    for values in grid:
        assert values and len(set(values)) == len(values), values
    if name in summarized():
        assert len(list(itertools.product(*grid))) > 1  # a sweep, not one run


@pytest.mark.parametrize("name", [REAL[0]] + [pytest.param(e, marks=pytest.mark.slow) for e in REAL[1:]])  # one in the fast suite
def test_real_family_with_the_hub_unreachable_fails_clearly(name, tmp_path):
    result = run_lata([f"experiment={name}", *EXPERTS, "device=cpu", "dry_run=true", "benchmark=none"], tmp_path,
                      env_extra={"HF_HUB_OFFLINE": "1"}, check=False)
    cfg = compose(config_name="config", overrides=[f"experiment={name}"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"'{cfg.model.base}' is neither a local directory nor a hub model that could be fetched" in result.stderr


@pytest.mark.slow
def test_an_experiment_runs_end_to_end_on_the_micro_zoo(micro_zoo_cache, tmp_path):
    sweep = tmp_path / "sweep"
    run_lata(["experiment=lambda_sweep", "zoo=micro", "benchmark.limit=2", "merge.lam=0.0,1.0",  # the command line narrows the sweep
              f"hydra.sweep.dir={sweep}"], tmp_path, env_extra={"LATA_CACHE": str(micro_zoo_cache)})
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # uniform and linear_rank at lambda 0 and 1
    assert (sweep / "best_lambda.png").is_file()
