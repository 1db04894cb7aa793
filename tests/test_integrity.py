"""Data integrity: a point is keyed by every byte that determines it, and everything reused is
checked against its recorded digest first (lata.io.digests, lata.run.fingerprints, lata.run.store).

The runs are in process (``lata.run.runner.run`` on a composed config), each as a new process would
start: nothing of an earlier run is kept in memory but what the disk holds.
"""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import family_args, run_lata, write_family
from lata.run import caches, store
from lata.io import digests
from lata.config import ConfigError, config_dir, register_configs
from lata.io.digests import DamagedFile, cached_build, file_digest, read_checked_json, write_checked_json
from lata.run.fingerprints import checkpoint_digest
from lata.run.runner import run

ROLES = ("base", "instruct", "math", "code")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Four float32 checkpoints of about 9 MB each: large enough that a sampled hash of each file
    would miss most of its tensors."""
    return write_family(tmp_path_factory.mktemp("wide") / "CK", hidden_size=128, intermediate_size=512,
                        num_hidden_layers=8, vocab_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def fam(wide_family, tmp_path):
    """This test's own copy of the wide family (tests edit it)."""
    root = tmp_path / "CK"
    shutil.copytree(wide_family["base"].parent, root)
    return {"base": root / "base", "instruct": root / "instruct",
            "experts": {k: root / k for k in wide_family["experts"]}}


def roles(d) -> dict[str, Path]:
    return {"base": d["base"], "instruct": d["instruct"], **d["experts"]}


def lata_run(d, tmp_path, name, *overrides, resume=True):
    """One ``lata`` job, as a fresh process would run it; returns (summary, log text)."""
    register_configs()
    for held in (caches._families, caches._analyses, digests._memo):
        held.clear()
    caches.forget_model()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=family_args(d) + [
            "merge=ta", "weighting=linear_rank", "progress=false", f"resume={str(resume).lower()}",
            f"save_model={tmp_path / name}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path}", *overrides])
    handler, logger = _Capture(), logging.getLogger("lata")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = run(cfg, tmp_path / f"run-{name}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return summary, "\n".join(handler.lines)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def restored(log: str) -> bool:
    return "results exist" in log and "merged model written" not in log


def edit_tensor_in_place(folder: Path, name: str, fn) -> None:
    """Rewrite one float32 tensor's bytes inside model.safetensors: same size, same header."""
    file = folder / "model.safetensors"
    with open(file, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[name]
        start, end = (8 + length + o for o in entry["data_offsets"])
        f.seek(start)
        values = np.frombuffer(f.read(end - start), dtype=np.float32)
        f.seek(start)
        f.write(fn(values).astype(np.float32).tobytes())


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- the table

def change_one_tensor(d):
    # a tensor that none of the 16 blocks of 64 KiB that keys used to sample (at i/16 of the
    # file) touches: 45 of this family's 75 tensors are such
    edit_tensor_in_place(d["experts"]["code"], "model.layers.5.mlp.down_proj.weight", lambda v: v * -3)


def change_configs(d):
    for path in roles(d).values():
        edit_json(path / "config.json", rope_theta=5e5)


def change_tokenizer(d):
    edit_json(d["instruct"] / "tokenizer_config.json", model_max_length=64)


@pytest.mark.parametrize("change", [change_one_tensor, change_configs, change_tokenizer])
def test_a_changed_input_is_merged_again_and_equals_a_fresh_merge(fam, tmp_path, change):
    (fam["instruct"] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    lata_run(fam, tmp_path, "out1")
    _, log = lata_run(fam, tmp_path, "out1b")  # nothing changed: restored, the model copied
    assert restored(log) and "copied from" in log
    assert files(tmp_path / "out1b") == files(tmp_path / "out1")
    change(fam)
    _, log = lata_run(fam, tmp_path, "out2")
    assert not restored(log), log
    lata_run(fam, tmp_path, "fresh", resume=False)
    assert files(tmp_path / "out2") == files(tmp_path / "fresh")
    assert files(tmp_path / "out2") != files(tmp_path / "out1")


def test_same_tensors_under_another_model_type_never_share_a_point(fam, tmp_path):
    lata_run(fam, tmp_path, "llama")
    for path in roles(fam).values():  # Mistral names its tensors as Llama does: the same bytes
        edit_json(path / "config.json", model_type="mistral", architectures=["MistralForCausalLM"])
    summary, log = lata_run(fam, tmp_path, "mistral")
    assert not restored(log) and summary["family"]["model_type"] == "mistral"
    assert json.loads((tmp_path / "mistral" / "config.json").read_text())["model_type"] == "mistral"
    lata_run(fam, tmp_path, "mistral-fresh", resume=False)
    assert files(tmp_path / "mistral") == files(tmp_path / "mistral-fresh")
    for path in roles(fam).values():  # an architecture without a JSON file, inferred: still its own point
        edit_json(path / "config.json", model_type="granite", architectures=["GraniteForCausalLM"])
    summary, log = lata_run(fam, tmp_path, "granite")
    assert not restored(log) and summary["family"]["model_type"] == "granite"
    assert json.loads((tmp_path / "granite" / "config.json").read_text())["model_type"] == "granite"


def test_identical_tensors_with_other_configs_have_other_keys(tmp_path):
    a = write_family(tmp_path / "a", experts=("math",))
    b = write_family(tmp_path / "b", experts=("math",))
    edit_json(b["base"] / "config.json", rope_theta=1234.0)
    assert checkpoint_digest(a["instruct"]) == checkpoint_digest(b["instruct"])  # the same bytes, other paths
    assert checkpoint_digest(a["base"]) != checkpoint_digest(b["base"])
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"merge": {"method": "ta", "lam": 1.0}, "weighting": {"name": "uniform"},
                            "benchmark": {"name": "none", "tasks": []}, "model": {"which": "instruct", "dtype": "auto"},
                            "out_dtype": None, "shard_size": "2GB"})
    key = lambda d: store.point_key(cfg, {"base": d["base"], "instruct": d["instruct"], **d["experts"]})  # noqa: E731
    assert key(a) != key(b)
    (b["base"] / "config.json").write_bytes((a["base"] / "config.json").read_bytes())
    assert key(a) == key(b)  # the same content wherever it lies


# ----------------------------------------------------------------------------- what is reused is checked

def test_a_damaged_stored_model_is_merged_again_not_copied(fam, tmp_path):
    lata_run(fam, tmp_path, "out1")
    shard = tmp_path / "out1" / "model.safetensors"
    stamp = shard.stat()
    with open(shard, "r+b") as f:  # 16 bytes of the stored output overwritten (in lm_head's data)
        f.seek(stamp.st_size - 64)
        f.write(b"\xff" * 16)
    os.utime(shard, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with its old mtime
    _, log = lata_run(fam, tmp_path, "out2")
    assert "is damaged" in log and str(shard) in log and "merged model written" in log
    lata_run(fam, tmp_path, "fresh", resume=False)
    assert files(tmp_path / "out2") == files(tmp_path / "fresh")
    # save_model itself damaged: not taken as holding the model (here copied from the whole one the
    # resume=false run stored with the point)
    with open(tmp_path / "out2" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 16)
    _, log = lata_run(fam, tmp_path, "out2", "overwrite=true")
    assert "out2/model.safetensors does not match its recorded digest (the record of the merged model" in log
    assert f"copied from {tmp_path / 'fresh'}" in log
    assert files(tmp_path / "out2") == files(tmp_path / "fresh")


def test_a_model_saved_by_a_run_that_failed_later_is_kept_not_refused(fam, tmp_path):
    """A run saved its model, then failed before its results were stored (here: the store entry
    removed): the same command, overwrite=false, finds its model whole and finishes the point."""
    lata_run(fam, tmp_path, "out1")
    saved = files(tmp_path / "out1")
    shutil.rmtree(tmp_path / "results")
    _, log = lata_run(fam, tmp_path, "out1")
    assert "already holds this point's merged model" in log and files(tmp_path / "out1") == saved
    _, log = lata_run(fam, tmp_path, "out1")
    assert restored(log)


@pytest.mark.parametrize("damage", ["truncate_summary", "flip_metrics_free_file", "no_manifest"])
def test_a_damaged_store_entry_is_computed_again_with_a_warning(fam, tmp_path, damage):
    lata_run(fam, tmp_path, "out1")
    (entry,) = (tmp_path / "results").iterdir()
    if damage == "truncate_summary":
        text = (entry / "summary.json").read_text()
        (entry / "summary.json").write_text(text[: len(text) // 2])
        named = entry / "summary.json"
    elif damage == "flip_metrics_free_file":
        data = bytearray((entry / "layer_analysis.json").read_bytes())
        data[len(data) // 2] ^= 0x01
        (entry / "layer_analysis.json").write_bytes(bytes(data))
        named = entry / "layer_analysis.json"
    else:
        (entry / "manifest.json").unlink()
        named = entry / "manifest.json"
    _, log = lata_run(fam, tmp_path, "out2")
    assert f"stored point {entry} is damaged" in log and str(named) in log and not restored(log)
    assert (tmp_path / "run-out2" / "layer_analysis.json").read_bytes() == \
        (tmp_path / "run-out1" / "layer_analysis.json").read_bytes()
    _, log = lata_run(fam, tmp_path, "out3")  # stored again, whole
    assert restored(log) and " is damaged" not in log


@pytest.mark.parametrize("seed", range(8))
def test_any_damage_to_what_a_run_stored_is_recomputed_never_fatal(tmp_path, seed):
    """Seeded damage (truncation, a byte flipped, wrong JSON) to one file a run left for later runs:
    a stored point's files, the saved model and its marker, the caches. The next run succeeds and
    its outputs equal the first run's."""
    import random

    d = write_family(tmp_path / "f", experts=("math", "code"))
    lata_run(d, tmp_path, "out1", "merge=ties")
    merged = files(tmp_path / "out1")
    kept = [p for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.name.startswith(".")
            and any(part in p.parts for part in ("results", "cache", "out1"))]
    rng = random.Random(seed)
    victim = rng.choice(kept)
    data = victim.read_bytes()
    damage = rng.choice(["truncate", "flip", "json"])
    if damage == "truncate":
        victim.write_bytes(data[: rng.randrange(len(data))])
    elif damage == "flip":
        i = rng.randrange(len(data))
        victim.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    else:
        victim.write_text(json.dumps(rng.choice([[], {}, None, 1, "x", {"files": 3}, {"digest": 1, "data": []}])))
    _, log = lata_run(d, tmp_path, "out2", "merge=ties")
    assert files(tmp_path / "out2") == merged, (victim, damage)
    assert (tmp_path / "run-out2" / "layer_analysis.json").read_bytes() == \
        (tmp_path / "run-out1" / "layer_analysis.json").read_bytes()


def test_a_cached_analysis_never_hides_a_non_finite_input(fam, tmp_path):
    """NaN in a block whose weight is 0, after the layer analysis was cached: refused, naming the file."""
    weights = "weighting=explicit", "++weighting.weights=[0,1,1,1,1,1,1,1]"
    lata_run(fam, tmp_path, "out1", *weights)
    edit_tensor_in_place(fam["experts"]["math"], "model.layers.0.mlp.up_proj.weight",
                         lambda v: np.where(np.arange(v.size) == 7, np.nan, v))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight.*math.*NaN"):
        lata_run(fam, tmp_path, "out2", *weights, resume=False)
    assert not (tmp_path / "out2").exists()


def test_a_non_finite_target_is_named_not_blamed_on_the_lambdas(fam, tmp_path):
    """The target is read by the merge only (pass 1 never reads it): a NaN there is named as the
    target's, not reported as merged values beyond the dtype's range."""
    target = tmp_path / "target"
    shutil.copytree(fam["instruct"], target)
    edit_tensor_in_place(target, "model.layers.6.self_attn.q_proj.weight",
                         lambda v: np.where(np.arange(v.size) == 3, np.inf, v))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.6.self_attn.q_proj.weight' in .*target.* \(target\) "
                                         r"contains Inf"):
        lata_run(fam, tmp_path, "out", f"++model.target={target}", "merge.lam=-1")
    assert not (tmp_path / "out").exists()


def test_a_damaged_cached_build_is_built_again(tmp_path, caplog):
    calls = []

    def build(d):
        calls.append(d)
        (d / "weights.bin").write_bytes(b"0123456789")

    first = cached_build(tmp_path, "toy", {"n": 1}, build, "1")
    assert cached_build(tmp_path, "toy", {"n": 1}, build, "1") == first and len(calls) == 1
    (first / "weights.bin").write_bytes(b"0123456788")  # same size, one byte changed
    with caplog.at_level("WARNING", logger="lata"):
        assert cached_build(tmp_path, "toy", {"n": 1}, build, "1") == first
    assert len(calls) == 2 and (first / "weights.bin").read_bytes() == b"0123456789"
    assert f"cached build {first} is damaged ({first / 'weights.bin'} does not match its recorded digest)" in caplog.text


def test_checked_json_refuses_any_damage(tmp_path):
    path = write_checked_json(tmp_path / "x.json", {"a": [1, 2.5, "x"]})
    assert read_checked_json(path) == {"a": [1, 2.5, "x"]}
    text = path.read_text()
    for bad in (text[:-5], text.replace("2.5", "2.6"), json.dumps({"a": 1}), "[]"):
        path.write_text(bad)
        with pytest.raises(DamagedFile, match=str(path)):
            read_checked_json(path)


# ----------------------------------------------------------------------------- the digests themselves

def test_file_digests_are_remembered_by_stamp_and_follow_every_change(tmp_path, monkeypatch):
    digests.use_memo_dir(tmp_path / "memo")
    monkeypatch.setattr(digests, "RACY_NS", 0)  # utime cannot age a file's ctime: no racy window here
    reads = []
    real = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda p: reads.append(p) or real(p))
    file = tmp_path / "w.bin"
    file.write_bytes(os.urandom(1 << 20))
    old = time.time_ns() - 10**10
    os.utime(file, ns=(old, old))  # older than the racy window
    first = file_digest(file)
    digests._memo.clear()  # another process: the disk memo answers
    assert file_digest(file) == first and len(reads) == 1
    with open(file, "r+b") as f:  # one byte, same size, the mtime put back
        f.seek(123_456)
        byte = f.read(1)
        f.seek(123_456)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(file, ns=(old, old))
    digests._memo.clear()
    assert file_digest(file) != first and len(reads) == 2  # the ctime changed: read again
    monkeypatch.setattr(digests, "RACY_NS", 2_000_000_000)
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"just written")
    file_digest(fresh)
    file_digest(fresh)
    assert len(reads) == 4  # a file written within the racy window is read every time
    digests.use_memo_dir(None)


def test_a_hub_cache_file_is_named_by_the_hubs_hash_unread(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--org--m"
    blob = "a" * 64
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / blob).write_bytes(b"weights")
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(f"../../blobs/{blob}")
    monkeypatch.setattr(digests, "_hash_file", lambda p: pytest.fail("a hub file was read"))
    assert file_digest(snap / "model.safetensors") == f"hub:{blob}"


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(digests.NotRegularFile, match="FIFO"):
        file_digest(fifo)


def test_the_code_version_ignores_docstrings_and_comments():
    from lata.run.fingerprints import _syntax

    a = b'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    b = b'def f(x):\n    """Other words."""\n    # a comment\n    return x + 1\n'
    c = b'def f(x):\n    return x + 2\n'
    assert _syntax(a) == _syntax(b) != _syntax(c)


# ----------------------------------------------------------------------------- refused before any work

def test_names_lambdas_and_paths_are_checked_before_any_work(fam, tmp_path):
    cases = [("++model.experts.$_$=" + str(fam["experts"]["math"]), "model.experts.\\$_\\$: '\\$_\\$' is not a usable name"),
             ("merge.lam=nan", "merge.lam=nan must be a finite number"),
             ("merge.lam=inf", "merge.lam=inf must be a finite number"),
             ("++model.experts.extra=", "model.experts.extra is empty")]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            lata_run(fam, tmp_path, "out", override)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("run-out/*"))


@pytest.mark.parametrize("key", ["hydra.run.dir", "paths.results_dir", "paths.cache_dir"])
def test_no_directory_lata_writes_may_lie_inside_an_input(fam, tmp_path, key):
    before = {p: p.read_bytes() for p in fam["experts"]["math"].iterdir()}
    inside = fam["experts"]["math"] / "sub"
    overrides = [] if key == "hydra.run.dir" else [f"{key}={inside}"]
    result = run_lata(family_args(fam) + overrides, tmp_path, check=False,
                      **({"run_dir": inside} if key == "hydra.run.dir" else {}))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lata: error: the ")
    assert "lies inside the input checkpoint expert 'math'" in result.stderr
    assert {p: p.read_bytes() for p in fam["experts"]["math"].iterdir()} == before


def test_degenerate_families_are_warned_about(tmp_path):
    d = write_family(tmp_path / "f", experts=("math", "code"))
    shutil.copy(d["instruct"] / "model.safetensors", d["experts"]["code"] / "model.safetensors")
    _, log = lata_run(d, tmp_path, "out")
    assert "expert 'code' equals the instruct model in every block" in log
    assert "expert 'math' equals" not in log
    shutil.copy(d["base"] / "model.safetensors", d["instruct"] / "model.safetensors")
    _, log = lata_run(d, tmp_path, "out2")
    assert "base and instruct are equal in every block" in log


def test_a_terminated_drawing_leaves_no_temporary_png(tmp_path):
    """The heatmap process killed while it writes a PNG (SIGTERM to the job's process group)."""
    script = ("import time, lata.results.plots as p\n"
              "from matplotlib.figure import Figure\n"
              "Figure.savefig = lambda self, f, **k: (open(f, 'wb').write(b'x'), time.sleep(60))\n"
              "p.main()\n")
    analysis = tmp_path / "a.json"
    analysis.write_text(json.dumps({"similarities": {"m": [0.1, 0.2]}, "weights": {"m": [0.0, 1.0]}}))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps({"analysis": str(analysis), "png": str(tmp_path / "h.png"), "title": "t"}) + "\n")
    proc.stdin.flush()
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".h.png.tmp-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".h.png.tmp-*"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_damaged_benchmark_data_is_exported_again(tmp_path, caplog):
    from lata.evaluation.tasks import data_digests

    first = data_digests(["lata_humaneval_offline"], tmp_path)
    exported = tmp_path / "humaneval.jsonl"
    exported.write_text(exported.read_text()[:100])
    with caplog.at_level("WARNING", logger="lata"):
        assert data_digests(["lata_humaneval_offline"], tmp_path) == first
    assert f"benchmark data {exported} differs from its source" in caplog.text
