"""The staged path (whole tensors read ahead onto the compute device, ``lata.accel.transfer``), run on
the CPU: the same bits as the sliced path for every method, bounded read-ahead, errors that
reach the step that failed. On a GPU the same code adds pinned memory and side streams
(benchmarks/device_check.py compares CPU and GPU bit for bit there)."""

import math
import os
import threading

import numpy as np
import pytest
import torch

import reference
from conftest import data_free_methods, write_family
from lata import (CheckpointError, Family, MergeConfig, WeightingConfig, iter_merged, merge_into_model,
                  merge_state_dict, merge_to_dir, plan_merge)
from lata import selection
from lata.analysis import layer_similarities
from lata.io.checkpoints import Checkpoint
from lata.accel.transfer import DeviceLoader, HostCopies


def family_of(d, target=None):
    return Family.open(d["base"], d["instruct"], d["experts"], target=target)


def merged(d, merge, weighting, staged, chunk, analysis=None, target=None):
    plan = plan_merge(family_of(d, target), merge, weighting, progress=False, analysis=analysis)
    plan = plan.with_options(staged=staged, chunk_size=chunk)
    return merge_state_dict(plan)


def assert_identical(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


CASES = [(MergeConfig(method=m), WeightingConfig(name=w)) for m in data_free_methods()
         for w in ("linear_rank", "threshold")] + [
    (MergeConfig(method="ties", topk_scope="global", density=0.3), WeightingConfig(name="log_rank")),
    (MergeConfig(method="dare_ties", lams={"math": 0.8, "code": -0.4}, anchor="base"), WeightingConfig(name="lines")),
]


@pytest.mark.parametrize("merge,weighting", CASES, ids=lambda c: getattr(c, "method", None) or c.name)
@pytest.mark.parametrize("family", ["f32", "bf16"])
def test_the_staged_path_gives_the_sliced_paths_bits(wide_dirs, wide_bf16_dirs, merge, weighting, family):
    d = wide_dirs if family == "f32" else wide_bf16_dirs
    analysis = layer_similarities(family_of(d), progress=False)
    sliced = merged(d, merge, weighting, staged=False, chunk=None, analysis=analysis)
    assert_identical(merged(d, merge, weighting, staged=True, chunk=37, analysis=analysis), sliced)
    assert_identical(merged(d, merge, weighting, staged=True, chunk=None, analysis=analysis), sliced)


def test_a_staged_forgetting_merge_onto_a_target_matches_the_reference(wide_dirs):
    merge, weighting = MergeConfig(method="ta", lam=-1.0), WeightingConfig(name="uniform")
    got = merged(wide_dirs, merge, weighting, staged=True, chunk=101, target=wide_dirs["experts"]["math"])
    # theta = theta_target + lam * (theta_code - theta_instruct) + lam * (theta_math - theta_instruct)
    target, instruct = reference.load(wide_dirs["experts"]["math"]), reference.load(wide_dirs["instruct"])
    experts = [reference.load(p) for p in wide_dirs["experts"].values()]
    for name, value in got.items():
        expected = target[name] - sum(e[name] - instruct[name] for e in experts)
        assert torch.allclose(value, expected, atol=1e-6), name


def test_a_staged_merge_to_disk_writes_the_same_checkpoint(wide_bf16_dirs, tmp_path):
    merge, weighting = MergeConfig(method="ties", density=0.3), WeightingConfig(name="linear_rank")
    expected = merged(wide_bf16_dirs, merge, weighting, staged=False, chunk=None)
    for i, (write_behind, shard_size) in enumerate([(True, "2GB"), (False, "9KB")]):
        plan = plan_merge(family_of(wide_bf16_dirs), merge, weighting, progress=False)
        plan = plan.with_options(staged=True, write_behind=write_behind)
        out = merge_to_dir(plan, tmp_path / f"out{i}", shard_size=shard_size, progress=False)
        assert_identical(reference.load(out), expected)


def test_staged_similarities_are_the_float64_sums(wide_bf16_dirs):
    family = family_of(wide_bf16_dirs)
    staged = layer_similarities(family, progress=False, staged=True)
    sliced = layer_similarities(family, progress=False, staged=False)
    models = [reference.load(p) for p in (wide_bf16_dirs["base"], wide_bf16_dirs["instruct"], *wide_bf16_dirs["experts"].values())]
    dot = {k: [0.0] * family.num_layers for k in family.expert_names}
    for name in models[0]:
        layer = family.layer_of(name)
        if layer is None:
            continue
        base = models[0][name].float()
        instr = (models[1][name].float() - base).double().numpy().ravel()
        for k, m in zip(family.expert_names, models[2:]):
            comp = (m[name].float() - base).double().numpy().ravel()
            dot[k][layer] += math.fsum(comp * instr)  # exact products, an exactly rounded sum
    for k in family.expert_names:
        assert np.allclose(staged.dot[k], dot[k], rtol=1e-13, atol=0)
        assert np.allclose(staged.similarities[k], sliced.similarities[k], rtol=1e-5, atol=0)


def test_kth_largest_by_bits_is_numpys_selection(monkeypatch):
    monkeypatch.setattr(selection, "BITS_STEP", 1000)  # several histogram steps
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20_011, generator=g) * torch.logspace(-30, 30, 20_011)
    x[::5] = 0.0
    x[1], x[2], x[3], x[4] = -0.0, math.inf, -math.inf, x[7]  # signed zeros, infinities, a tie
    for k in (1, 2, 3, 777, 10_006, 20_000, 20_011):
        assert selection.kth_largest_by_bits(x, k) == float(np.partition(x.numpy(), x.numel() - k)[x.numel() - k])
    magnitudes = x.abs()
    for k in (1, 4_000, 20_011):
        assert selection.kth_largest_by_bits(magnitudes, k) == selection.kth_largest(magnitudes, k)
    with pytest.raises(ValueError, match="k=0 is out of range"):
        selection.kth_largest_by_bits(x, 0)


def test_read_copies_what_the_memory_map_holds_and_names_a_truncated_file(wide_bf16_dirs, tmp_path, monkeypatch):
    from lata.io import checkpoints

    monkeypatch.setattr(checkpoints, "READ_PIECE", 1000)  # tensors in several pieces, read out of order
    ckpt = Checkpoint(wide_bf16_dirs["experts"]["code"])
    for name in ckpt.names:
        got, reads = ckpt.read_later(name)
        assert len(reads) == -(-ckpt.nbytes(name) // 1000)
        for read in reversed(reads):
            read()
        assert got.dtype == ckpt.get(name).dtype and torch.equal(got, ckpt.get(name)), name
    d = write_family(tmp_path / "cut")
    ckpt = Checkpoint(d["base"])
    last = max(ckpt.names, key=lambda n: ckpt._spans[n][1])
    file = ckpt.files[last]
    os.truncate(file, file.stat().st_size - 6)
    with pytest.raises(CheckpointError, match=rf"cannot read tensor '{last}' from .*model.safetensors: "
                                              r"the file ends 6 bytes early"):
        for read in ckpt.read_later(last)[1]:
            read()


class FakeCheckpoint:
    """Tensors of a given size that record when they are read."""

    def __init__(self, sizes, fail_at=None):
        self.sizes, self.fail_at, self.reads = sizes, fail_at, []
        self.lock = threading.Lock()

    def nbytes(self, name):
        return self.sizes[name]

    def read_later(self, name, pin=False):
        tensor = torch.zeros(self.sizes[name], dtype=torch.uint8)

        def read():
            if name == self.fail_at:
                raise CheckpointError(f"cannot read tensor '{name}'")
            with self.lock:
                self.reads.append(name)
            tensor.fill_(int(name))

        return tensor, [read]


def test_the_loader_reads_ahead_within_its_budget_and_in_order():
    sizes = {i: 100 for i in range(12)}
    ckpt = FakeCheckpoint(sizes)
    schedule = [[(ckpt, i)] for i in range(12)]
    with DeviceLoader(schedule, "cpu", ahead_bytes=250, threads=2) as loader:
        for i in range(12):
            tensors = loader.take(i)
            assert [int(t[0]) for t in tensors] == [i]
            ahead = len(ckpt.reads) - (i + 1)  # steps read beyond the one taken
            assert ahead <= 3  # 250 bytes: two steps of 100 ahead, plus one being read
    assert ckpt.reads == list(range(12))


def test_the_loader_hands_a_read_error_to_the_step_that_failed():
    ckpt = FakeCheckpoint({i: 10 for i in range(6)}, fail_at=3)
    with DeviceLoader([[(ckpt, i)] for i in range(6)], "cpu") as loader:
        for i in range(3):
            loader.take(i)
        with pytest.raises(CheckpointError, match="cannot read tensor '3'"):
            loader.take(3)


def test_a_loader_closed_early_stops():
    ckpt = FakeCheckpoint({i: 100 for i in range(50)})
    loader = DeviceLoader([[(ckpt, i)] for i in range(50)], "cpu", ahead_bytes=100)
    loader.take(0)
    loader.close()  # must not wait for the 49 steps never taken
    assert len(ckpt.reads) < 50


def test_host_copies_keep_the_order_they_were_given_in():
    copies = HostCopies("cpu")
    out = []
    for i in range(4):
        out += copies.put(i, torch.full((3,), float(i))) if i % 2 else copies.keep(i, torch.full((3,), float(i)))
    out += copies.drain()
    assert [k for k, _ in out] == [0, 1, 2, 3]
    assert [float(t[0]) for _, t in out] == [0.0, 1.0, 2.0, 3.0]


def test_merge_into_model_on_the_staged_path(wide_dirs):
    from transformers import AutoModelForCausalLM

    merge, weighting = MergeConfig(method="ties", density=0.3), WeightingConfig(name="linear_rank")
    expected = merged(wide_dirs, merge, weighting, staged=False, chunk=None)
    plan = plan_merge(family_of(wide_dirs), merge, weighting, progress=False)
    plan = plan.with_options(staged=True)
    kept = dict(iter_merged(plan, progress=False, keep_on_device=True))
    assert_identical(kept, expected)
    model = merge_into_model(plan, AutoModelForCausalLM.from_pretrained(wide_dirs["instruct"]))
    state = model.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
