"""The real families (hub ids): every config that names them composes and validates, MergeBench's
experts are named as MergeBench publishes them, the ``mergebench`` suite names tasks that
lm-eval's registry has with the settings docs/evaluation.md states, and without the hub a run
stops with one line naming the hub id it needs."""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import run_lata, write_family
from lata.config import config_dir, register_configs, validate
from lata.io.checkpoints import _HUB_ID

CONF = Path(config_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                     if p.stem.startswith(("mergebench_", "paper_")))
MERGEBENCH = [e for e in EXPERIMENTS if e.startswith("mergebench_")]
DOMAINS = ["instruction", "math", "coding", "multilingual", "safety"]  # MergeBench's five
# paper_*: the paper's experts are not public; the user names them
PLACEHOLDERS = ["++model.experts.math=someone/math-expert", "++model.experts.code=someone/code-expert"]
# MergeBench's families: {experiment: (base, instruct)}
FAMILIES = {"mergebench_llama32_3b": ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
            "mergebench_llama31_8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"),
            "mergebench_gemma2_2b": ("google/gemma-2-2b", "google/gemma-2-2b-it"),
            "mergebench_gemma2_9b": ("google/gemma-2-9b", "google/gemma-2-9b-it")}
MULTILINGUAL = [f"{task}_{lang}" for lang in ("fr", "es", "de", "ru") for task in ("m_mmlu", "arc", "hellaswag")]


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def hub_models() -> list[str]:
    """conf/model/*.yaml that name a hub id (base, instruct or an expert)."""
    register_configs()
    names = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in sorted((CONF / "model").glob("*.yaml")):
            model = compose(config_name="config", overrides=[f"model={path.stem}"]).model
            values = [model.base, model.instruct, *model.experts.values()]
            if any(isinstance(v, str) and _HUB_ID.match(v) and not Path(v).exists() for v in values):
                names.append(path.stem)
    return names


def overrides(name: str) -> list[str]:
    """The command line of a real-family config: the experiment, or the model config."""
    if name in EXPERIMENTS:
        return [f"experiment={name}", *([] if name in MERGEBENCH else PLACEHOLDERS)]
    return [f"model={name}"]


REAL = EXPERIMENTS + hub_models()


def test_the_real_families_are_all_here():
    assert MERGEBENCH == sorted(FAMILIES) and {"paper_llama3_8b", "paper_gemma2_9b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", REAL)
def test_every_real_family_composes_and_validates_with_hub_ids(name):
    cfg = compose(config_name="config", overrides=overrides(name))
    validate(cfg)
    roles = [cfg.model.base, cfg.model.instruct, *cfg.model.experts.values()]
    assert cfg.model.experts and all(_HUB_ID.match(str(r)) for r in roles), roles


@pytest.mark.parametrize("name", MERGEBENCH)
def test_mergebench_experts_are_mergebench_s_own_anchored_at_the_base(name):
    """MergeBench/<base model's name>_<domain>, as MergeBench's merging code (merging/main.py)
    builds them; fine-tuned from the base model, so the merge is anchored there."""
    cfg = compose(config_name="config", overrides=[f"experiment={name}"])
    base, instruct = FAMILIES[name]
    assert (cfg.model.base, cfg.model.instruct) == (base, instruct)
    stem = base.split("/")[1]
    assert dict(cfg.model.experts) == {d: f"MergeBench/{stem}_{d}" for d in DOMAINS}
    assert cfg.merge.anchor == "base" and cfg.merge.method == "ties" and cfg.device == "cuda"
    # the comment names the experts fine-tuned from the instruct model, and the anchor they need
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert f"MergeBench/{instruct.split('/')[1]}_<domain>" in text and "merge.anchor=instruct" in text
    # each single-run command the comment gives composes and validates
    for line in re.findall(r"^#\s+lata (experiment=.*)$", text, re.MULTILINE):
        validate(compose(config_name="config", overrides=line.split()))
    # a subset of the experts, and the suite
    fewer = compose(config_name="config", overrides=[f"experiment={name}", "~model.experts.safety"])
    validate(fewer)
    assert list(fewer.model.experts) == DOMAINS[:-1]
    validate(compose(config_name="config", overrides=[f"experiment={name}", "benchmark=mergebench"]))


@pytest.fixture(scope="module")
def lm_eval_registry():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_config(index: dict, name: str) -> dict:
    """A registry task's YAML with its includes resolved (newer lm-eval keeps it on the index
    entry, older versions the file's path)."""
    entry = index[name]
    if hasattr(entry, "cfg"):
        return dict(entry.cfg)
    from lm_eval.utils import load_yaml_config

    return load_yaml_config(entry["yaml_path"], mode="simple")


def test_the_mergebench_suite_names_lm_eval_s_tasks_with_mergebench_s_settings(lm_eval_registry):
    from lata.evaluation.tasks import TASKS

    bench = compose(config_name="config", overrides=["benchmark=mergebench"]).benchmark
    assert bench.name == "mergebench"
    assert list(bench.tasks) == ["ifeval", "gsm8k_cot", *MULTILINGUAL, "lata_humaneval"]
    theirs = [t for t in bench.tasks if t not in TASKS]
    assert theirs == list(bench.tasks)[:-1]
    index = lm_eval_registry.task_index
    missing = [t for t in theirs if t not in index]
    assert not missing, f"not in lm-eval's registry: {missing}"
    cfg = {t: task_config(index, t) for t in theirs}
    # instruction following: IFEval, 0-shot; math: GSM8K chain of thought, 8-shot, every test problem
    assert (cfg["ifeval"]["dataset_path"], cfg["ifeval"]["num_fewshot"]) == ("google/IFEval", 0)
    assert (cfg["gsm8k_cot"]["dataset_path"], cfg["gsm8k_cot"]["num_fewshot"], cfg["gsm8k_cot"]["test_split"]) == (
        "openai/gsm8k", 8, "test")
    # multilingual: the Okapi translations, multiple choice, no few-shot count of their own (0-shot)
    for task in MULTILINGUAL:
        family, lang = task.rsplit("_", 1)
        assert cfg[task]["dataset_path"] == "alexandrainst/" + {"m_mmlu": "m_mmlu", "arc": "m_arc",
                                                                 "hellaswag": "m_hellaswag"}[family]
        assert cfg[task]["dataset_name"] == lang and cfg[task]["output_type"] == "multiple_choice"
        assert "num_fewshot" not in cfg[task]
    # coding: LATA's HumanEval in the sandbox, sampled as MergeBench samples (10 at T = 0.2)
    assert TASKS["lata_humaneval"].kind == "code"
    assert (bench.code_samples, bench.temperature, list(bench.pass_k)) == (10, 0.2, [1])
    assert bench.allow_code_execution is False  # opt in, as every suite but the zoo's
    # lm-eval's own HumanEval+ and MBPP+ (MergeBench's coding tasks) execute code outside the sandbox
    assert all(task_config(index, t).get("unsafe_code") for t in ("humaneval_plus", "mbpp_plus"))


def _stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _offline_error(overrides: list[str], tmp_path, monkeypatch) -> str:
    """The error ``lata.run.runner.run`` stops with, in this process, with the hub offline."""
    import huggingface_hub.constants

    from lata.io.files import CheckpointError
    from lata.run.runner import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose(config_name="config", overrides=[*overrides, "device=cpu", "benchmark=none", "progress=false",
                                                   f"paths.cache_dir={tmp_path / 'cache'}",
                                                   f"paths.results_dir={tmp_path / 'results'}",
                                                   f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(CheckpointError) as caught:
        run(cfg, tmp_path / "run")
    return str(caught.value)


def _local_base_and_instruct(tmp_path) -> list[str]:
    dirs = write_family(tmp_path / "family", experts=(), dtype=torch.float32)
    return [f"model.base={dirs['base']}", f"model.instruct={dirs['instruct']}"]


def test_without_the_hub_the_command_stops_with_exit_code_2_and_one_line_naming_the_hub_id(tmp_path):
    """The command line, once (a subprocess each); every config below, in this process."""
    name = "mergebench_llama32_3b"
    base, _ = FAMILIES[name]
    result = run_lata([f"experiment={name}", "device=cpu", "benchmark=none"], tmp_path,
                      env_extra={"HF_HUB_OFFLINE": "1"}, check=False)
    lines = _stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"lata: error: '{base}' is neither a local directory nor a hub model")
    # with a local base and instruct, the first expert's hub id
    result = run_lata([f"experiment={name}", *_local_base_and_instruct(tmp_path), "device=cpu", "benchmark=none"],
                      tmp_path, env_extra={"HF_HUB_OFFLINE": "1"}, check=False)
    lines = _stderr_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"lata: error: 'MergeBench/{base.split('/')[1]}_instruction' is neither a local")


@pytest.mark.parametrize("name", REAL)
def test_without_the_hub_every_real_family_stops_at_its_base_s_hub_id(name, tmp_path, monkeypatch):
    cfg = compose(config_name="config", overrides=overrides(name))
    message = _offline_error(overrides(name), tmp_path, monkeypatch)
    assert "\n" not in message
    assert message.startswith(f"'{cfg.model.base}' is neither a local directory nor a hub model")


@pytest.mark.parametrize("name", MERGEBENCH)
def test_without_the_hub_a_mergebench_family_with_a_local_base_stops_at_its_first_expert(name, tmp_path, monkeypatch):
    """The experts' hub ids reach the checkpoint resolver, MergeBench's instruction expert first."""
    cfg = compose(config_name="config", overrides=[f"experiment={name}"])
    message = _offline_error([f"experiment={name}", *_local_base_and_instruct(tmp_path)], tmp_path, monkeypatch)
    assert "\n" not in message
    assert message.startswith(f"'{cfg.model.experts.instruction}' is neither a local directory nor a hub model")
