"""Every config in conf/ composes, validates and builds its objects; bad keys and values are refused."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import similarity_weightings
from lata.cli import config_dir
from lata.config import ConfigError, register_configs, validate
from lata.config import WeightingConfig
from lata.methods import METHODS
from lata.weightings import WEIGHTINGS, layer_weights

CONF = Path(config_dir())
PATHS = ["model=paths", "++model.base=B", "++model.instruct=I", "++model.experts.math=M", "benchmark=none"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def test_conf_groups_exist_one_yaml_per_registered_method_and_weighting():
    assert options("merge") == sorted(METHODS.names() + ["none"])
    # one YAML per registered weighting, and a preset YAML (learned_likelihood) only of a registered one
    assert set(WEIGHTINGS.names()) <= set(options("weighting"))
    for option in set(options("weighting")) - set(WEIGHTINGS.names()):
        assert compose(config_name="config", overrides=[f"weighting={option}"]).weighting.name in WEIGHTINGS.names()
    assert {"ta", "ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"} <= set(
        METHODS.names())
    assert {"uniform", "threshold", "linear_rank", "log_rank", "explicit", "lines"} <= set(WEIGHTINGS.names())
    assert "none" in options("benchmark") and "none" in options("logger")
    assert {"paths", "zoo"} <= set(options("model"))
    assert {"micro", "small"} <= set(options("zoo"))
    assert {"none", "zoo", "offline", "paper"} <= set(options("benchmark"))


def test_default_config():
    cfg = compose(config_name="config")
    validate(cfg)
    assert cfg.model.embedded == "zoo" and cfg.zoo.name == "small" and dict(cfg.model.experts) == {"math": "", "code": ""}
    assert cfg.merge.method == "ta" and cfg.weighting.name == "linear_rank" and cfg.benchmark.name == "zoo"
    assert cfg.save_model is None and cfg.device == "cpu"
    assert cfg.model.target is None
    # evaluation context: 2048 tokens on every suite unless raised; null gives the model's own
    for suite in ("zoo", "offline", "paper"):
        assert compose(config_name="config", overrides=[f"benchmark={suite}"]).benchmark.max_length == 2048
    assert compose(config_name="config", overrides=["benchmark.max_length=null"]).benchmark.max_length is None


@pytest.mark.parametrize("method", METHODS.names())  # merge=none builds nothing
def test_every_merge_config_builds_its_method_with_the_declared_defaults(method):
    cfg = compose(config_name="config", overrides=[f"merge={method}"])
    validate(cfg)
    params = {k: v for k, v in cfg.merge.items() if k not in ("method", "lam", "lams", "anchor")}
    assert set(params) == set(METHODS.parameters(method))  # the YAML lists every key the method has
    built = METHODS.build(cfg.merge.method, params)
    assert built == METHODS.get(method)() and built.name == method


# w for similarities [0.99, 0.1, 0.5, 0.7] (L = 4), by the formulas in docs/method.md
EXPECTED_WEIGHTS = {"uniform": [1, 1, 1, 1], "threshold": [0, 1, 1, 1], "linear_rank": [0, 1, 0.5, 0],
                    "log_rank": [0, 1, 0.6309297535714575, 0], "explicit": [0, 0, 0.5, 1],
                    "lines": [0.5, 0.5 + 0.5 / 3, 0.5 + 1 / 3, 1.0],
                    "shuffled": [0.5, 0, 1, 0]}  # linear_rank's [0, 1, 0.5, 0] taken in block order [2, 0, 1, 3]


@pytest.mark.parametrize("weighting", similarity_weightings())
def test_every_weighting_config_computes_weights(weighting):
    overrides = [f"weighting={weighting}"] + (["weighting.weights=[0,0,0.5,1]"] if weighting == "explicit" else [])
    cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    w = WeightingConfig.of(cfg.weighting)
    got = layer_weights([0.99, 0.1, 0.5, 0.7], w.name, normalize=w.normalize, **w.params)
    assert got == pytest.approx(EXPECTED_WEIGHTS[weighting], abs=1e-12)


def test_experiment_config():
    cfg = compose(config_name="config", overrides=["experiment=zoo_lata_ties"])
    validate(cfg)
    assert cfg.merge.method == "ties" and cfg.merge.lams.math == 1.2 and cfg.weighting.name == "linear_rank"


def test_issue_command_line_composes():
    cfg = compose(config_name="config", overrides=PATHS + [
        "++model.experts.code=C", "merge=ties", "merge.density=0.2", "weighting=linear_rank",
        "weighting.drop=0.5", "benchmark=none", "logger=none", "save_model=OUT", "++merge.lams.math=-1.0"])
    validate(cfg)
    assert dict(cfg.model.experts) == {"math": "M", "code": "C"} and cfg.merge.lams.math == -1.0


def test_misspelt_key_is_refused():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="densty"):
        compose(config_name="config", overrides=["merge=ties", "merge.densty=0.3"])
    # added with +: refused by the method's registry entry, with the key it was close to
    with pytest.raises(ConfigError, match=r"merge.densty is not a key of merge=ties; did you mean merge.density\?"):
        validate(compose(config_name="config", overrides=["merge=ties", "+merge.densty=0.3"]))
    with pytest.raises(ConfigError, match="weighting.drop is not a key of weighting=lines; its keys: alpha, beta"):
        validate(compose(config_name="config", overrides=["weighting=lines", "+weighting.drop=0.3"]))


def test_a_key_of_another_method_is_refused_and_left_out_of_the_node():
    # merge=ta carries no density, p or seed (so they never enter its resume key)
    cfg = compose(config_name="config", overrides=["merge=ta"])
    assert set(cfg.merge) == {"method", "lam", "lams", "anchor"}
    with pytest.raises(ConfigCompositionException, match="merge.density"):
        compose(config_name="config", overrides=["merge=ta", "merge.density=0.3"])
    with pytest.raises(ConfigError, match="merge.density is not a key of merge=ta; it has no keys of its own"):
        validate(compose(config_name="config", overrides=["merge=ta", "+merge.density=0.3"]))
    with pytest.raises(ConfigError, match="merge.p is not a key of merge=none"):
        validate(compose(config_name="config", overrides=PATHS + ["merge=none", "+merge.p=0.3"]))


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="merge.density='lots' must be a number"):
        validate(compose(config_name="config", overrides=["merge=ties", "merge.density=lots"]))
    with pytest.raises(ConfigError, match="merge.seed=0.5 must be an integer"):
        validate(compose(config_name="config", overrides=["merge=dare", "merge.seed=0.5"]))
    with pytest.raises(ConfigError, match="merge.lam='abc' must be a number"):
        validate(compose(config_name="config", overrides=["merge.lam=abc"]))


def test_unknown_group_option_lists_the_allowed_ones():
    with pytest.raises(Exception, match="(?s)merge/foo.*ta"):
        compose(config_name="config", overrides=["merge=foo"])


@pytest.mark.parametrize("override, message", [
    ("merge=ties merge.density=0", r"merge.density=0.0 is out of range; it must lie in \(0.0, 1.0\]"),
    ("merge=ties merge.density=1.5", "merge.density=1.5 is out of range"),
    ("weighting.drop=1.0", r"weighting.drop=1.0 is out of range; it must lie in \[0.0, 1.0\)"),
    ("merge=dare merge.p=1.0", "merge.p=1.0 is out of range"),
    ("merge.method=foo", "merge.method='foo' is not allowed; choose one of: " + ", ".join(METHODS.names() + ["none"])),
    ("merge=ties merge.topk_scope=layer", "merge.topk_scope='layer' is not allowed; choose one of: tensor, global"),
    ("merge=breadcrumbs merge.gamma=1", r"merge.gamma=1.0 is out of range; it must lie in \[0.0, 1.0\)"),
    ("merge=della merge.epsilon=0.5", "merge.density=0.5 and merge.epsilon=0.5: the keep probabilities"),
    ("weighting=threshold weighting.threshold=2", "weighting.threshold=2.0 is out of range"),
    ("merge.method=no_such_module.Method", "merge.method='no_such_module.Method' cannot be imported"),
    ("merge.anchor=expert", "merge.anchor='expert' is not allowed; choose one of: instruct, base"),
    ("weighting.normalize=max", "weighting.normalize='max' is not allowed; choose one of: none, mean"),
    ("out_dtype=int8", "out_dtype='int8' is not allowed"),
    ("device=tpu", "device='tpu' is not allowed"),
    ("shard_size=huge", "shard_size='huge' is not a size"),
    ("threads=0", "threads=0 must be at least 1"),
    ("benchmark.max_length=1", "benchmark.max_length=1 must be at least 2 tokens"),
    ("++merge.lams.chemistry=1.0", "merge.lams.chemistry names no expert; experts are: math"),
])
def test_out_of_range_values_name_the_key(override, message):
    cfg = compose(config_name="config", overrides=PATHS + override.split())
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_explicit_without_weights_and_paths_without_base_are_refused():
    with pytest.raises(ConfigError, match="weighting.weights"):
        validate(compose(config_name="config", overrides=["weighting=explicit"]))
    with pytest.raises(ConfigError, match=r"model.base is not set"):
        validate(compose(config_name="config", overrides=["model=paths"]))


@pytest.mark.parametrize("suite", ["none", "zoo", "offline", "paper"])
def test_every_benchmark_suite_composes_with_known_tasks(suite, tmp_path):
    """Each suite names LATA's own tasks or lm-eval's standard ones (the paper suite's gsm8k and
    wikitext follow lm-eval's protocols: docs/evaluation.md)."""
    from lata.evaluation.tasks import LM_EVAL_TASKS, TASKS

    cfg = compose(config_name="config", overrides=[f"benchmark={suite}"])
    validate(cfg)
    assert all(t in TASKS or t in LM_EVAL_TASKS for t in cfg.benchmark.tasks)
    assert (suite == "none") == (not cfg.benchmark.tasks)
    if suite == "paper":
        assert list(cfg.benchmark.tasks) == ["wikitext", "gsm8k", "lata_humaneval"]


def test_benchmark_values_are_checked():
    # task names are open (lm-eval's registry, the user's YAMLs): checked by the harness; a user
    # task directory must exist
    validate(compose(config_name="config", overrides=["benchmark.tasks=[arc_easy,hellaswag]"]))
    with pytest.raises(ConfigError, match="benchmark.include_path=/no/such/dir is not a directory"):
        validate(compose(config_name="config", overrides=["benchmark.include_path=/no/such/dir"]))
    with pytest.raises(ConfigError, match="benchmark.pass_k has 5"):
        validate(compose(config_name="config", overrides=["benchmark.pass_k=[1,5]"]))
    with pytest.raises(ConfigError, match="model.which='chef'"):
        validate(compose(config_name="config", overrides=PATHS + ["merge=none", "model.which=chef"]))


@pytest.mark.parametrize("launcher, target", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
    ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launchers_compose(launcher, target):
    cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target


def test_optuna_search_composes_as_a_multirun_over_lam_and_drop():
    cfg = compose(config_name="config", overrides=["hparams_search=optuna", "objective.ppl_ceiling=60"],
                  return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"merge.lam": "interval(0.1, 1.5)", "weighting.drop": "interval(0.0, 0.9)"}
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.objective.ppl_ceiling == 60.0
    assert cfg.hydra.callbacks.report._target_ == "lata.cli.SweepReport"


def test_smollm2_is_an_evaluation_only_model_on_the_offline_suite():
    cfg = compose(config_name="config", overrides=["model=smollm2"])
    assert cfg.model.embedded == "smollm2" and cfg.merge.method == "none" and cfg.benchmark.name == "offline"
