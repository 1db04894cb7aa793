"""The `lata` app end to end, as a user runs it (subprocesses, real checkpoints on disk)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import reference
from conftest import family_args, run_lata, write_family


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family"))


def test_issue_command_merges_to_a_loadable_checkpoint(dirs, tmp_path):
    out = tmp_path / "OUT"
    run_lata(family_args(dirs) + ["merge=ties", "merge.density=0.2", "weighting=linear_rank", "weighting.drop=0.5",
                                  "benchmark=none", "logger=none", f"save_model={out}"], tmp_path)
    expected = reference.merge(dirs, method="ties", weighting="linear_rank", density=0.2, drop=0.5)
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in expected.items():
        err = (state[name] - tensor).norm() / tensor.norm()
        assert err < 1e-5, name
    run = tmp_path / "run"
    analysis = json.loads((run / "layer_analysis.json").read_text())
    assert analysis["num_layers"] == 4 and set(analysis["similarities"]) == {"math", "code"}
    assert analysis["weights"]["math"] == reference.weights(analysis["similarities"]["math"], "linear_rank")
    csv_lines = (run / "layer_analysis.csv").read_text().splitlines()
    assert csv_lines[0] == "expert,layer,similarity,comp_norm,instr_norm,weight" and len(csv_lines) == 1 + 2 * 4
    assert (run / "layer_analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert "merge:\n  method: ties" in (run / "config.yaml").read_text()
    # a second command on the same family reuses the first's layer analysis and magnitude selections
    again = run_lata(family_args(dirs) + ["merge=ties", "merge.density=0.2", "weighting=log_rank", "merge.lam=0.7",
                                          "logger=none", f"save_model={tmp_path / 'OUT2'}"], tmp_path)
    assert "layer analysis reused" in again.stdout and "magnitude selections reused" in again.stdout
    expected = reference.merge(dirs, method="ties", weighting="log_rank", density=0.2, lam=0.7)
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "OUT2").state_dict()
    for name, tensor in expected.items():
        assert (state[name] - tensor).norm() / tensor.norm() < 1e-5, name


def test_the_command_ends_after_its_exit_handlers_with_every_stream_flushed(dirs, tmp_path):
    # lata.cli.entry skips the interpreter's teardown after a job that ended well
    code = ("import atexit, sys\nfrom lata.cli import entry\n"
            "atexit.register(lambda: print('exit handler ran'))\n"
            "sys.stdout.write('buffered, ')\n"
            "sys.argv = ['lata'] + sys.argv[1:]\nentry()\nprint('after entry')\n")
    result = subprocess.run([sys.executable, "-c", code, *family_args(dirs), "dry_run=true",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("buffered, ") and result.stdout.endswith("exit handler ran\n")
    assert "after entry" not in result.stdout
    assert (tmp_path / "run" / "summary.json").is_file()


def test_forgetting_with_a_negative_lambda(dirs, tmp_path):
    out = tmp_path / "OUT"
    run_lata(family_args(dirs) + ["merge=ta", "weighting=threshold", "weighting.threshold=0.9",
                                  "++merge.lams.math=-1.0", "++merge.lams.code=0.0", f"save_model={out}"], tmp_path)
    expected = reference.merge(dirs, method="ta", weighting="threshold", threshold=0.9, lams={"math": -1.0, "code": 0.0})
    got = reference.load(out)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name


def test_model_target_subtracts_a_vector_from_the_model_that_has_the_skill(dirs, tmp_path):
    """The paper's forgetting, as the issue writes it: theta = theta_math - v_math (threshold)."""
    only_math = dict(dirs, experts={"math": dirs["experts"]["math"]})
    out = tmp_path / "OUT"
    run_lata(family_args(only_math) + ["merge=ta", "weighting=threshold", "weighting.threshold=0.8",
                                       "model.target=math", "++merge.lams.math=-1.0", f"save_model={out}"], tmp_path)
    expected = reference.merge(only_math, method="ta", weighting="threshold", threshold=0.8, lams={"math": -1.0},
                               target=dirs["experts"]["math"])
    got = reference.load(out)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["family"]["target"] == str(dirs["experts"]["math"])
    # the target is an input: never a place to write to
    again = run_lata(family_args(only_math) + ["model.target=math", f"save_model={dirs['experts']['math']}",
                                               "overwrite=force"], tmp_path, check=False)
    assert again.returncode == 2 and "expert 'math'" in again.stderr


def test_model_target_errors_are_one_line(dirs, tmp_path):
    result = run_lata(family_args(dirs) + ["merge=none", "model.target=math"], tmp_path, check=False)
    assert result.returncode == 2 and "model.target='math'" in result.stderr and "merge=none" in result.stderr
    missing = tmp_path / "nowhere"
    result = run_lata(family_args(dirs) + [f"model.target={missing}", f"save_model={tmp_path / 'OUT'}"], tmp_path,
                      check=False)
    assert result.returncode == 2 and str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "OUT").exists()


def test_bad_input_is_one_clear_line_and_writes_nothing(dirs, tmp_path):
    bad = dict(dirs, experts={"math": tmp_path / "missing", "code": dirs["experts"]["code"]})
    out = tmp_path / "OUT"
    result = run_lata(family_args(bad) + [f"save_model={out}"], tmp_path, check=False)
    assert result.returncode == 2
    assert f"lata: error: checkpoint directory {tmp_path / 'missing'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "run" / "layer_analysis.json").exists()


def test_out_of_range_value_is_refused_with_the_key(dirs, tmp_path):
    result = run_lata(family_args(dirs) + ["merge=ties", "merge.density=1.5"], tmp_path, check=False)
    assert result.returncode == 2 and "merge.density=1.5 is out of range" in result.stderr


def test_dry_run_reads_headers_only(dirs, tmp_path):
    run_lata(family_args(dirs) + ["dry_run=true"], tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["family"]["num_layers"] == 4 and summary["family"]["model_type"] == "llama"
    assert not (tmp_path / "run" / "layer_analysis.json").exists()


def test_default_app_merges_the_zoo_and_evaluates_it(micro_zoo_cache, tmp_path):
    out = tmp_path / "merged"
    result = run_lata(["zoo=micro", f"save_model={out}", "benchmark.limit=2"], tmp_path,
                      env_extra={"LATA_CACHE": str(micro_zoo_cache)})
    assert "layer analysis" in result.stderr + result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and (out / "tokenizer.json").is_file()
    run = tmp_path / "run"
    analysis = json.loads((run / "layer_analysis.json").read_text())
    assert set(analysis["weights"]) == {"math", "code"}
    assert sorted(analysis["weights"]["math"]) == [0.0, 0.0, 0.5, 1.0]  # linear_rank, drop 0.5, L = 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"zoo_math", "zoo_code", "zoo_ua", "zoo_ppl"}
    assert all(values["samples"] == 2 for values in metrics.values())
    assert 0 <= metrics["zoo_math"]["exact_match_strict"] <= 1 and metrics["zoo_ppl"]["token_perplexity"] > 1


USER_TASK = """task: my_pick
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
"""


def test_a_users_lm_eval_task_runs_beside_latas_own(micro_zoo_cache, tmp_path):
    """benchmark.include_path: the user's task YAML over a local JSON file, scored by lm-eval.
    One choice per question: accuracy is 1 whatever the model."""
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": [f"A{i}"]}) + "\n" for i in range(3)))
    (tasks / "my_pick.yaml").write_text(USER_TASK.format(data=data))
    run_lata(["zoo=micro", "merge=none", "benchmark.tasks=[my_pick,zoo_ppl]", f"benchmark.include_path={tasks}",
              "benchmark.limit=2"], tmp_path, env_extra={"LATA_CACHE": str(micro_zoo_cache)})
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["my_pick"]["acc"] == 1.0 and metrics["my_pick"]["samples"] == 2
    assert metrics["zoo_ppl"]["samples"] == 2 and metrics["zoo_ppl"]["token_perplexity"] > 1
    # a name in neither LATA's tasks, lm-eval's registry nor the include path: one line, exit 2
    result = run_lata(["zoo=micro", "merge=none", "benchmark.tasks=[my_pik]", f"benchmark.include_path={tasks}"],
                      tmp_path, env_extra={"LATA_CACHE": str(micro_zoo_cache)}, check=False,
                      run_dir=tmp_path / "bad")
    assert result.returncode == 2 and "unknown benchmark task 'my_pik'" in result.stderr
    assert "Traceback" not in result.stderr


def test_merge_none_evaluates_one_role_unmerged(micro_zoo_cache, tmp_path):
    run_lata(["zoo=micro", "merge=none", "model.which=math", "benchmark.tasks=[zoo_ppl]", "benchmark.limit=2"],
             tmp_path, env_extra={"LATA_CACHE": str(micro_zoo_cache)})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["evaluated"] == "math" and set(summary["metrics"]) == {"zoo_ppl"}
    assert not (tmp_path / "run" / "layer_analysis.json").exists()
