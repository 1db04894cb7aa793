"""Data safety: inputs are never touched, a saved model is whole or absent, interrupts clean up.

One test (or a few) per rule of ``lata.io.outputs`` and the runner's resume; most drive the
``lata`` command as a user would, on a tiny Llama family written to disk.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import reference
from conftest import family_args, run_lata, write_family
from lata import CheckpointError, Family, MergeConfig, WeightingConfig, merge_to_dir, plan_merge
from lata.accel import kernels
from lata.cli import config_dir
from lata.plan import output_bytes
from lata.config import ConfigError, register_configs, validate
from lata.io.outputs import MARKER, OutputError, check_target, writer_lock


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def open_family(d) -> Family:
    return Family.open(d["base"], d["instruct"], d["experts"])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("family") / "CK")


# ----------------------------------------------------------------------------- 1. inputs

def test_overwrite_true_over_the_inputs_parent_is_refused_and_every_input_byte_stays(tmp_path):
    d = write_family(tmp_path / "CK2")
    before = digest(tmp_path / "CK2")
    result = run_lata(family_args(d) + ["merge=ties", "weighting=linear_rank", "logger=none",
                                        f"save_model={tmp_path / 'CK2'}", "overwrite=true", "resume=false"],
                      tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"save_model={tmp_path / 'CK2'} contains the input checkpoint base ({d['base']})" in result.stderr
    assert "Traceback" not in result.stderr
    # one expert as the target, even with overwrite=force
    result = run_lata(family_args(d) + [f"save_model={d['experts']['math']}", "overwrite=force"], tmp_path, check=False)
    assert result.returncode == 2
    assert f"is the input checkpoint expert 'math' ({d['experts']['math']})" in result.stderr
    assert digest(tmp_path / "CK2") == before
    assert not (tmp_path / "run" / "layer_analysis.json").exists()  # refused before any work


def test_inputs_are_found_through_symbolic_links_and_from_inside(family, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(family["base"].parent)
    inputs = {"base": family["base"], "instruct": family["instruct"]}
    with pytest.raises(OutputError, match=r"lies inside the input checkpoint base"):
        check_target(family["base"] / "merged", overwrite="force", inputs=inputs)
    with pytest.raises(OutputError, match=r"is the input checkpoint instruct"):
        check_target(link / "instruct", overwrite="force", inputs=inputs)
    with pytest.raises(OutputError, match=r"is a symbolic link"):
        check_target(link, overwrite="force", inputs=inputs)
    with pytest.raises(OutputError, match=r"contains the current directory"):
        check_target(Path.cwd().parent, overwrite="force", protected={"current directory": Path.cwd()})
    assert check_target(tmp_path / "fresh" / "merged", inputs=inputs) == tmp_path / "fresh" / "merged"


def test_overwrite_true_replaces_only_what_lata_wrote(family, tmp_path):
    plan = plan_merge(open_family(family), MergeConfig(), WeightingConfig(), progress=False)
    out = tmp_path / "out"
    merge_to_dir(plan, out, progress=False)
    marker = json.loads((out / MARKER).read_text())
    assert marker["method"] == "ta" and set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    with pytest.raises(OutputError, match="holds a checkpoint LATA wrote; choose another or set overwrite=true to replace it"):
        merge_to_dir(plan, out, progress=False)
    merge_to_dir(plan, out, overwrite=True, progress=False)  # LATA's own output: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files LATA did not write \(notes.txt\).*overwrite=force"):
        merge_to_dir(plan, out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    merge_to_dir(plan, out, overwrite="force", progress=False)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    theirs = tmp_path / "theirs"  # a directory with no marker at all
    theirs.mkdir()
    (theirs / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match=f"output directory {theirs} is not empty; .* overwrite=true"):
        merge_to_dir(plan, theirs, progress=False)
    with pytest.raises(OutputError, match=rf"output directory {theirs} was not written by LATA \(precious.txt\); "
                                          rf"overwrite=true only replaces LATA's own outputs.*overwrite=force"):
        merge_to_dir(plan, theirs, overwrite=True, progress=False)
    assert (theirs / "precious.txt").read_text() == "keep me"


def test_the_overwrite_check_is_made_again_just_before_the_rename(family, tmp_path, monkeypatch):
    from lata import sinks

    plan = plan_merge(open_family(family), MergeConfig(), WeightingConfig(), progress=False)
    out = tmp_path / "out"
    merge_to_dir(plan, out, progress=False)
    real = sinks.iter_merged

    def meanwhile(*args, **kwargs):  # another program writes into the target during the merge
        (out / "theirs.txt").write_text("theirs")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(sinks, "iter_merged", meanwhile)
    with pytest.raises(OutputError, match=r"holds files LATA did not write \(theirs.txt\)"):
        merge_to_dir(plan, out, overwrite=True, progress=False)
    assert (out / "theirs.txt").read_text() == "theirs" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 2. resume

def test_a_resumed_point_writes_its_model_into_its_own_save_model(family, tmp_path):
    args = family_args(family) + ["merge=ties", "weighting=linear_rank", "logger=none"]
    m1, m2, m3 = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
    run_lata(args + [f"save_model={m1}"], tmp_path)
    m2.mkdir()
    second = run_lata(args + [f"save_model={m2}"], tmp_path, run_dir=tmp_path / "run2")
    assert "copied from" in second.stdout + second.stderr
    assert digest(m2) == digest(m1)  # whole: every file, byte for byte
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["saved_model"] == str(m2) and summary["resumed_from"] == str(tmp_path / "run")
    # the same point with another output dtype: m1 is written again, in bfloat16
    run_lata(args + [f"save_model={m1}", "overwrite=true", "out_dtype=bfloat16"], tmp_path, run_dir=tmp_path / "run3")
    state = reference.load(m1)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    config = json.loads((m1 / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    expected = reference.merge(family, method="ties", weighting="linear_rank")
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name
    # the stored point's own model is gone: the model is merged again, not skipped
    for p in m1.iterdir():
        p.unlink()
    m1.rmdir()
    run_lata(args + [f"save_model={m3}", "out_dtype=bfloat16"], tmp_path, run_dir=tmp_path / "run4")
    assert reference.load(m3).keys() == state.keys()
    assert all(torch.equal(reference.load(m3)[n], t) for n, t in state.items())


def test_rerunning_a_finished_command_keeps_its_model_without_overwrite(family, tmp_path):
    args = family_args(family) + ["logger=none", f"save_model={tmp_path / 'out'}"]
    run_lata(args, tmp_path)
    before = digest(tmp_path / "out")
    again = run_lata(args, tmp_path, run_dir=tmp_path / "again")
    assert "holds its merged model; skipped" in again.stdout + again.stderr
    assert digest(tmp_path / "out") == before
    # a shard size that changes the files is a different model: refused without overwrite
    other = run_lata(args + ["shard_size=20KB"], tmp_path, run_dir=tmp_path / "other", check=False)
    assert other.returncode == 2 and "holds a checkpoint LATA wrote; choose another or set overwrite=true" in other.stderr


# ----------------------------------------------------------------------------- 3. misspelt keys

@pytest.mark.parametrize("override, message", [
    ("merge=ties ++merge.densty=0.7", "merge.densty is not a key of merge=ties; did you mean merge.density?"),
    ("+weighting.dorp=0.3", "weighting.dorp is not a key of weighting=linear_rank; did you mean weighting.drop?"),
    ("++save_modle=out", "save_modle is not a known key; did you mean save_model?"),
    ("++benchmark.limt=3", "benchmark.limit"),
    ("++zzz=1", "zzz is not a known key; known keys: model, merge"),
])
def test_misspelt_keys_are_refused_whatever_the_prefix(override, message):
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=override.split())
        with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("?", r"\?")):
            validate(cfg)
        # dict-typed keys take any name
        validate(compose(config_name="config", overrides=["++model.experts.ua=''", "++merge.lams.math=-1.0"]))


def test_a_misspelt_key_stops_the_command_before_any_output(family, tmp_path):
    result = run_lata(family_args(family) + [f"++save_modle={tmp_path / 'out'}"], tmp_path, check=False)
    assert result.returncode == 2 and "save_modle is not a known key; did you mean save_model?" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "config.yaml").exists()


# ----------------------------------------------------------------------------- 4. dtypes

def test_an_integer_tensor_where_the_base_has_floats_is_refused_by_name(tmp_path):
    d = write_family(tmp_path / "f")
    rewrite(d["experts"]["math"], lambda s: s.update({"model.norm.weight": (s["model.norm.weight"] * 100).to(torch.int8)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' is I8 in expert 'math' .* but F32 in base"):
        open_family(d)


def test_integer_tensors_equal_in_every_role_are_copied_and_differing_ones_refused(tmp_path):
    d = write_family(tmp_path / "f")
    table = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    for path in [d["base"], d["instruct"], *d["experts"].values()]:
        rewrite(path, lambda s: s.update({"model.rotary_table": table.clone()}))
    plan = plan_merge(open_family(d), MergeConfig(), WeightingConfig(), progress=False)
    merge_to_dir(plan, tmp_path / "out", progress=False)
    assert torch.equal(reference.load(tmp_path / "out")["model.rotary_table"], table)
    rewrite(d["experts"]["code"], lambda s: s.update({"model.rotary_table": table + 1}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.rotary_table' \(I64, not floating point\) differs "
                                              r"between base .* and expert 'code'"):
        open_family(d)


# ----------------------------------------------------------------------------- 5. finite outputs

@pytest.mark.parametrize("fused", [False, True], ids=["torch", "kernels"])
def test_experts_whose_sum_overflows_give_an_error_naming_the_tensor_and_no_checkpoint(tmp_path, monkeypatch, fused):
    d = write_family(tmp_path / "f")
    for name in ("math", "code"):
        rewrite(d["experts"][name], lambda s: s["model.layers.3.mlp.up_proj.weight"].__setitem__((1, 2), 3e38))
    if fused:
        monkeypatch.setattr(kernels, "MIN_BYTES", 0)
        assert kernels.available()
    plan = plan_merge(open_family(d), MergeConfig(), WeightingConfig(name="uniform"), progress=False)
    with pytest.raises(CheckpointError, match=r"merged tensor 'model.layers.3.mlp.up_proj.weight' has 1 non-finite "
                                              r"value\(s\) \(NaN or Inf\) in float32; nothing was written"):
        merge_to_dir(plan, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no checkpoint, no temporary, no lock


def test_float16_output_above_its_range_is_refused(tmp_path):
    d = write_family(tmp_path / "f")
    for path in [d["base"], d["instruct"], *d["experts"].values()]:  # theta_0 itself is too large for float16
        rewrite(path, lambda s: s["model.norm.weight"].__setitem__(0, 70000.0))
    plan = plan_merge(open_family(d), MergeConfig(), WeightingConfig(name="uniform"), progress=False)
    with pytest.raises(CheckpointError, match=r"merged tensor 'model.norm.weight' has 1 non-finite .* in float16.*"
                                              r"65504: try out_dtype=bfloat16"):
        merge_to_dir(plan, tmp_path / "out", out_dtype="float16", progress=False)
    assert not (tmp_path / "out").exists()
    merge_to_dir(plan, tmp_path / "out", out_dtype="bfloat16", progress=False)  # in range there


# ----------------------------------------------------------------------------- 6. interrupts

def patched_lata(patch: str, args, tmp_path, run_dir, **popen):
    """The lata command started with ``patch`` run first (a test's stand-in for a slow disk, a
    full one...), as a ``Popen``."""
    env = {**os.environ, "LATA_CACHE": str(tmp_path / "cache"), "LATA_RESULTS": str(tmp_path / "results")}
    code = f"{patch}\nimport sys\nfrom lata.cli import entry\nsys.argv = ['lata'] + sys.argv[1:]\nentry()\n"
    return subprocess.Popen([sys.executable, "-c", code, *args, f"hydra.run.dir={run_dir}", "progress=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


# the writer slowed down, so that a signal or a second run finds the first one writing
SLOW_WRITER = """
import time
from lata.io import shards
add = shards.StreamingShardWriter.add
shards.StreamingShardWriter.add = lambda self, name, tensor: time.sleep(0.08) or add(self, name, tensor)
"""


def start_slow(family, tmp_path, out, run_dir):
    return patched_lata(SLOW_WRITER, family_args(family) + [f"save_model={out}", "threads=1"], tmp_path, run_dir)


def wait_for_temporary(parent: Path, name: str, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(f".{name}.tmp-") for p in parent.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError("the merge never started writing")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_writing_ends_the_run_cleanly(family, tmp_path, sig):
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    proc = start_slow(family, tmp_path, out, tmp_path / "run")
    wait_for_temporary(out.parent, "merged", proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("lata:")]
    assert lines == [f"lata: interrupted by {signal.Signals(sig).name} in the run (run directory {tmp_path / 'run'}): "
                     "its temporary outputs were removed; finished points are stored, and the same command "
                     "resumes after them"]
    assert "Traceback" not in stderr
    assert list(out.parent.iterdir()) == []  # no checkpoint, no temporary directory, no lock file


def test_leftovers_of_a_killed_run_are_removed_by_the_next_write(family, tmp_path):
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir()
    proc = start_slow(family, tmp_path, out, tmp_path / "run")
    wait_for_temporary(out.parent, "merged", proc)
    proc.kill()
    proc.communicate()
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(".merged.tmp-")]
    assert left, "SIGKILL leaves its temporary directory"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = out.parent / f".merged.tmp-{alive.pid}-0000abcd"  # a live process's: kept
        theirs.mkdir()
        run_lata(family_args(family) + [f"save_model={out}"], tmp_path)
        assert sorted(p.name for p in out.parent.iterdir()) == sorted(["merged", theirs.name])
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------- 7. output paths

def test_output_path_problems_are_one_line_before_any_read(family, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = [
        (tmp_path / "afile" / "merged", f"cannot write {tmp_path / 'afile' / 'merged'}: {tmp_path / 'afile'} is a "
                                        f"file, not a directory"),
        (Path("/proc/lata-merged"), "cannot write in /proc"),
        (Path("/sys/lata/merged"), "cannot write in /sys"),
    ]
    for target, message in cases:
        result = run_lata(family_args(family) + [f"save_model={target}"], tmp_path, check=False)
        assert result.returncode == 2 and f"lata: error: {message}" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and not (tmp_path / "run" / "layer_analysis.json").exists()


def test_a_read_only_directory_is_refused_by_name(tmp_path, monkeypatch):
    from lata.io import outputs

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match=f"cannot write in {tmp_path}: Permission denied"):
        check_target(tmp_path / "merged")


def test_too_little_free_space_is_refused_before_any_read(family, tmp_path):
    tiny = ("import os\nfrom lata.io import outputs\n"
            "outputs.os = type('os', (), {**vars(os), 'statvfs': staticmethod(lambda path: os.statvfs_result("
            "(4096, 4096, 1000, 10, 10, 0, 0, 0, 0, 255)))})")
    proc = patched_lata(tiny, family_args(family) + [f"save_model={tmp_path / 'out'}"], tmp_path, tmp_path / "run")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-2000:]
    needs = output_bytes(open_family(family)) / 1e3
    assert (f"lata: error: save_model={tmp_path / 'out'}: the merged checkpoint needs {needs:.3g} kB, but the file "
            f"system of {tmp_path} has 41 kB free") in stderr, stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "layer_analysis.json").exists()


def test_a_disk_that_fills_up_while_writing_names_the_file_and_leaves_nothing(family, tmp_path, monkeypatch):
    from lata.io import shards

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.os, "pwrite", full)
    plan = plan_merge(open_family(family), MergeConfig(), WeightingConfig(), progress=False)
    with pytest.raises(OSError, match=r"No space left on device \(writing tensor '.*'\): '.*model.safetensors'"):
        merge_to_dir(plan, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 8. one writer

def test_a_second_writer_of_one_save_model_fails_naming_the_first(family, tmp_path):
    out = tmp_path / "merged"
    with writer_lock(out):
        result = run_lata(family_args(family) + [f"save_model={out}"], tmp_path, check=False)
    assert result.returncode == 2
    assert (f"another lata run (PID {os.getpid()} on {socket.gethostname()}) is writing {out} now" in result.stderr)
    assert not out.exists() and list(tmp_path.glob(".merged*")) == []


def test_two_runs_started_together_never_both_succeed(family, tmp_path):
    out = tmp_path / "merged"
    procs = [start_slow(family, tmp_path, out, tmp_path / f"run{i}") for i in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-1500:] for _, err in results]
    assert "is writing" in next(err for code, err in results if code == 2)
    assert reference.load(out).keys() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 9. weights

def test_a_weighting_that_drops_every_layer_warns_by_name(family, caplog):
    plan_merge(open_family(family), MergeConfig(), WeightingConfig(name="linear_rank", drop=0.95), progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("gives every one of the 4 layers of expert 'math' weight 0" in m for m in warned), warned
    assert any("expert 'code'" in m for m in warned)


@pytest.mark.parametrize("threshold", [-1.5, 1.01])
def test_threshold_outside_minus_one_to_one_is_refused(threshold):
    from lata.config import validate_weighting

    with pytest.raises(ConfigError, match=rf"weighting.threshold={threshold} is out of range; it must lie in \[-1.0, 1.0\]"):
        validate_weighting(WeightingConfig(name="threshold", threshold=threshold))


# ----------------------------------------------------------------------------- 10. config.json

@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 5}, r"says num_hidden_layers=5, but its tensors hold 4 layers"),
    ({"vocab_size": 50}, r"says vocab_size=50, but tensor 'model.embed_tokens.weight' has 48 rows"),
])
def test_a_config_that_disagrees_with_its_tensors_is_refused(tmp_path, changes, message):
    d = write_family(tmp_path / "f")
    edit_config(d["instruct"], **changes)
    with pytest.raises(CheckpointError, match=r"instruct \(.*instruct/config.json\) " + message):
        open_family(d)


def test_untied_embeddings_without_an_lm_head_are_refused(tmp_path):
    d = write_family(tmp_path / "f")
    for path in [d["base"], d["instruct"], *d["experts"].values()]:
        rewrite(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"says tie_word_embeddings=false, but there is no tensor 'lm_head.weight'"):
        open_family(d)


@pytest.mark.parametrize("tied", [False, True])
def test_the_written_config_agrees_with_the_written_tensors(tmp_path, tied):
    d = write_family(tmp_path / "f", num_hidden_layers=3, tie_word_embeddings=tied)
    plan = plan_merge(open_family(d), MergeConfig(), WeightingConfig(name="uniform"), progress=False)
    out = merge_to_dir(plan, tmp_path / "out", out_dtype="bfloat16", progress=False)
    config, state = json.loads((out / "config.json").read_text()), reference.load(out)
    layers = {int(n.split(".")[2]) for n in state if n.startswith("model.layers.")}
    assert config["num_hidden_layers"] == len(layers) == 3
    assert config["vocab_size"] == state["model.embed_tokens.weight"].shape[0]
    assert config.get("tie_word_embeddings", False) == tied == ("lm_head.weight" not in state)
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
