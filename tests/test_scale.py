"""The streaming engine's schedule never changes the result.

Read-ahead and write-behind threads on or off, torch thread counts, slice sizes, shard sizes
and O_DIRECT writes are all scheduling: every merged tensor must come out bit-identical.
"""

import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import reference
from buffered_shards import ShardedWriter
from lata import CheckpointError, Family, MergeConfig, WeightingConfig, merge_state_dict, merge_to_dir, plan_merge
from lata.analysis import layer_similarities
from lata import engine
from lata.accel import compute
from lata.accel.compute import SliceWorkers
from lata.io import pagecache
from lata.io.checkpoints import Checkpoint
from lata.io.prefetch import Prefetcher
from lata.io.shards import StreamingShardWriter
from lata.methods.ties import trim
from lata.selection import kth_largest, kth_largest_magnitude

CASES = [
    dict(method="ta", weighting="linear_rank"),
    dict(method="ties", weighting="linear_rank", density=0.3),
    dict(method="ties", weighting="log_rank", density=0.2, topk_scope="global"),
    dict(method="dare", weighting="uniform", p=0.4, seed=3),
    dict(method="dare_ties", weighting="threshold", p=0.3, seed=1, threshold=0.8),
]


@pytest.fixture
def dirs(wide_dirs):
    return wide_dirs


@pytest.fixture
def bf16_dirs(wide_bf16_dirs):
    return wide_bf16_dirs


def open_family(d):
    return Family.open(d["base"], d["instruct"], d["experts"])


def make_plan(d, case):
    merge = MergeConfig(**{k: v for k, v in case.items() if k in ("method", "density", "topk_scope", "p", "seed")})
    own = {"threshold": case.get("threshold", 0.95)} if case["weighting"] == "threshold" else {}
    weighting = WeightingConfig(name=case["weighting"], **own)
    return plan_merge(open_family(d), merge, weighting, progress=False)


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def assert_identical(got: dict, expected: dict):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['method']}-{c['weighting']}")
@pytest.mark.parametrize("family", ["f32", "bf16"])
def test_schedule_does_not_change_the_merge(dirs, bf16_dirs, case, family, monkeypatch):
    monkeypatch.setattr(pagecache, "resident", lambda *a, **k: False)  # read ahead as on a cold cache
    d = dirs if family == "f32" else bf16_dirs
    baseline = with_threads(1, lambda: _state(make_plan(d, case), prefetch=False, chunk_size=1 << 20))
    assert_state_matches_reference(baseline, d, case)
    # (torch threads, slice workers, read-ahead, slice size)
    for threads, workers, prefetch, chunk in [(2, 1, True, None), (1, 2, True, 7), (2, 2, False, 64),
                                              (2, 3, True, 1000)]:
        plan = with_threads(threads, lambda: make_plan(d, case))
        got = with_threads(threads, lambda: _state(plan, prefetch=prefetch, chunk_size=chunk, workers=workers))
        assert_identical(got, baseline)


@pytest.mark.parametrize("workers", [1, 2])
def test_ties_thresholds_are_the_same_with_all_experts_at_once_or_one_at_a_time(dirs, monkeypatch, workers):
    case = CASES[1]
    together = _state(make_plan(dirs, case), prefetch=True, chunk_size=100, workers=workers)
    assert_state_matches_reference(together, dirs, case)
    monkeypatch.setattr(engine, "MAGNITUDE_BYTES", 0)  # every tensor over the budget: one expert at a time
    assert_identical(_state(make_plan(dirs, case), prefetch=True, chunk_size=100, workers=workers), together)


def _state(plan, prefetch, chunk_size, workers=1):
    return merge_state_dict(plan.with_options(prefetch=prefetch, chunk_size=chunk_size, threads=workers))


def assert_state_matches_reference(got, d, case):
    expected = reference.merge(d, **case)
    for name, tensor in expected.items():
        g, e = got[name].double(), tensor.double()
        # bfloat16 outputs: float32 rounding differences may move a value by one bfloat16 step
        rtol = 1e-5 if tensor.dtype == torch.float32 else 1e-2
        assert (g - e).norm() / e.norm().clamp(min=1e-12) < rtol, name


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c["method"])
def test_shard_size_threads_and_direct_io_give_identical_checkpoints(dirs, tmp_path, case):
    expected = merge_state_dict(make_plan(dirs, case))
    for i, (shard_size, overlap, direct, chunk) in enumerate(
            [("2GB", True, True, None), ("8KB", True, True, 100), ("30KB", False, False, None),
             ("1KB", True, False, 33)]):
        plan = make_plan(dirs, case).with_options(prefetch=overlap, write_behind=overlap, direct_io=direct,
                                                  chunk_size=chunk)
        out = merge_to_dir(plan, tmp_path / f"out{i}", shard_size=shard_size, progress=False)
        shards = sorted(out.glob("*.safetensors"))
        assert (len(shards) > 1) == (shard_size != "2GB")
        assert_identical(reference.load(out), expected)


def test_direct_io_and_threaded_writer_write_the_same_bytes(dirs, tmp_path):
    plan = make_plan(dirs, CASES[1])
    outs = []
    for i, (direct, threaded) in enumerate([(True, True), (False, False)]):
        outs.append(merge_to_dir(plan.with_options(direct_io=direct, write_behind=threaded), tmp_path / f"o{i}", shard_size="20KB", progress=False))
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs (which refuses O_DIRECT)")
def test_direct_io_falls_back_where_the_file_system_refuses_it(dirs, tmp_path):
    import tempfile

    plan = make_plan(dirs, CASES[0])
    expected = merge_state_dict(plan)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        out = merge_to_dir(plan, Path(shm) / "out", progress=False)
        assert_identical(reference.load(out), expected)


def test_streaming_writer_shards_like_the_buffered_writer(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate([5, 300, 7, 1000, 1, 64, 64, 2000])}
    tensors["ids"] = torch.arange(10)
    tensors["half"] = torch.randn(33, generator=g).to(torch.bfloat16)
    for max_bytes in [1, 1000, 5000, 1 << 30]:
        a, b = tmp_path / f"a{max_bytes}", tmp_path / f"b{max_bytes}"
        a.mkdir()
        b.mkdir()
        old = ShardedWriter(a, max_bytes)
        for n, t in tensors.items():
            old.add(n, t)
        old.finish()
        new = StreamingShardWriter(b, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], max_bytes,
                                   direct=True)
        for n, t in tensors.items():
            new.add(n, t)
        new.finish()
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for path in b.glob("*.safetensors"):
            with safe_open(str(path), "pt") as h, safe_open(str(a / path.name), "pt") as h_old:
                assert sorted(h.keys()) == sorted(h_old.keys())
                for n in h.keys():
                    assert torch.equal(h.get_tensor(n), tensors[n])


@pytest.mark.parametrize("behind", [0, 2500, 1 << 30])
def test_writer_thread_holds_at_most_its_byte_budget(tmp_path, behind):
    import time

    sizes = [100, 400, 4000, 50, 50, 300, 900, 10]  # float32 elements
    tensors = {f"t{i}": torch.full((s,), float(i)) for i, s in enumerate(sizes)}
    waiting = []
    writer = StreamingShardWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 1 << 30,
                                  direct=True, behind_bytes=behind, on_written=lambda t: time.sleep(0.02))
    for n, t in tensors.items():
        writer.add(n, t)
        waiting.append(writer._behind)
    writer.finish()
    # a tensor is handed over when it fits in the budget, or when nothing else waits
    assert all(w <= max(behind, 4 * max(sizes)) for w in waiting)
    if behind == 0:
        assert waiting == [4 * s for s in sizes]  # one at a time
    if behind == 1 << 30:
        assert waiting[-1] > 4 * sizes[-1]  # never waited: the slow writer is behind
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as h:
        for n, t in tensors.items():
            assert torch.equal(h.get_tensor(n), t)


def test_aligned_tensors_go_to_the_file_from_their_own_memory(tmp_path, monkeypatch):
    from lata.io import shards
    from lata.accel.compute import page_aligned_empty

    copied = []
    memmove = shards.ctypes.memmove
    monkeypatch.setattr(shards.ctypes, "memmove", lambda dst, src, n: copied.append(n) or memmove(dst, src, n))
    g = torch.Generator().manual_seed(0)
    sizes = [4096, 3000, 1024, 1024, 8192, 10]  # float32 elements: 16 KiB, ..., then 4 KiB + 4 KiB, ...
    tensors = {}
    for i, n in enumerate(sizes):
        tensors[f"t{i}"] = page_aligned_empty((n,), torch.float32).copy_(torch.randn(n, generator=g))
    outs = []
    for direct in (True, False):
        out = tmp_path / f"direct{direct}"
        out.mkdir()
        writer = StreamingShardWriter(out, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 1 << 30,
                                      direct=direct, threaded=False)
        for n, t in tensors.items():
            writer.add(n, t)
        writer.finish()
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    header = 8 + int.from_bytes(outs[0][:8], "little")
    assert header % 4096 == 0  # the data starts page-aligned
    # the header (4096 B) is staged; t0 goes straight from memory; t1 (12000 B) leaves the file
    # misaligned: it and all after it are copied into the staging buffer, but t1's 8192 aligned bytes
    assert sum(copied) == 4096 + 4 * sum(sizes[1:]) - 8192
    with safe_open(str(tmp_path / "directTrue" / "model.safetensors"), "pt") as h:
        for n, t in tensors.items():
            assert torch.equal(h.get_tensor(n), t)


def test_streaming_writer_refuses_an_unplanned_tensor(tmp_path):
    writer = StreamingShardWriter(tmp_path, [("a", (2,), torch.float32)], 1 << 20)
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        writer.add("b", torch.zeros(2))
    writer.abort()


def test_thread_count_does_not_change_the_similarities(dirs):
    family = open_family(dirs)
    one = with_threads(1, lambda: layer_similarities(family, progress=False, prefetch=False, threads=1))
    two = with_threads(2, lambda: layer_similarities(family, progress=False))
    workers = layer_similarities(family, progress=False, threads=3)
    assert one.similarities == two.similarities == workers.similarities


def test_auto_threads_is_one_worker_per_core_at_most_eight(monkeypatch):
    monkeypatch.setattr(compute.os, "sched_getaffinity", lambda pid: set(range(3)), raising=False)
    assert compute.auto_threads() == 3 and SliceWorkers(None).threads == 3
    monkeypatch.setattr(compute.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert compute.auto_threads() == 8
    assert SliceWorkers(None, device="cuda").threads == 1  # an accelerator computes in the calling thread
    assert SliceWorkers(2).threads == 2


def test_finite_check_fast_path(dirs, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil

    d = {k: (Path(shutil.copytree(v, tmp_path / k)) if k != "experts" else
             {e: Path(shutil.copytree(p, tmp_path / e)) for e, p in v.items()}) for k, v in dirs.items()}
    path = d["experts"]["code"] / "model.safetensors"
    state = load_file(str(path))
    state["model.embed_tokens.weight"][0, :4] = torch.tensor([3e38, 3e38, -3e38, 3e38])  # finite; the sum overflows
    save_file(state, str(path), metadata={"format": "pt"})
    plan_merge(open_family(d), MergeConfig(), WeightingConfig(), progress=False)  # not refused
    state["model.embed_tokens.weight"][5, 5] = float("-inf")
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' in .*code/model.safetensors "
                                              r"\(expert 'code'\) contains Inf"):
        plan_merge(open_family(d), MergeConfig(), WeightingConfig(), progress=False)


@pytest.mark.parametrize("n", [1, 2, 17, 1000, 300_000])
def test_kth_largest_is_exact(n):
    g = torch.Generator().manual_seed(n)
    values = [torch.rand(n, generator=g), torch.randn(n, generator=g).round(decimals=1).abs(), torch.zeros(n)]
    for v in values:
        for k in sorted({1, max(1, n // 5), max(1, n // 2), n}):
            expected = float(torch.sort(v, descending=True).values[k - 1])
            assert kth_largest(v, k) == expected
            assert kth_largest_magnitude(-v, k) == expected
            assert float(torch.kthvalue(v, n - k + 1).values) == expected


def test_trim_keeps_values_tied_with_the_threshold_and_signed_zeros():
    v = torch.tensor([1.0, -1.0, 0.999999, -0.0, 2.0, -3.0, 0.0])
    assert trim(v, 1.0).tolist() == [1.0, -1.0, 0.0, 0.0, 2.0, -3.0, 0.0]
    assert trim(v, 0.0).tolist() == v.tolist()
    assert trim(v.double(), 1.0).tolist() == [1.0, -1.0, 0.0, 0.0, 2.0, -3.0, 0.0]


def test_released_tensors_stay_readable(dirs):
    ckpt = Checkpoint(dirs["base"])
    name = "model.embed_tokens.weight"
    before = ckpt.get(name).clone()
    view = ckpt.get(name)
    ckpt.prefetch([name])
    ckpt.release([name])
    assert torch.equal(view, before)
    ckpt.close()


def test_read_ahead_thread_runs_only_for_what_the_page_cache_lacks(dirs, monkeypatch):
    ckpt = Checkpoint(dirs["base"])
    schedule = [[(ckpt, n)] for n in ckpt.names]
    for name in ckpt.names:
        ckpt.get(name).sum()  # just written and read: in the page cache
    assert ckpt.cached(ckpt.names) and ckpt.cached(ckpt.names, samples=2)
    with Prefetcher(schedule) as prefetcher:
        assert prefetcher._thread is None
    monkeypatch.setattr(pagecache, "resident", lambda *a, **k: False)
    with Prefetcher(schedule) as prefetcher:
        assert prefetcher._thread is not None
    ckpt.close()


def test_cached_sees_pages_evicted_from_the_page_cache(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"\1" * (64 * mmap.PAGESIZE))
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # clean pages can be evicted, dirty ones not
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # as Checkpoint maps
        base = pagecache.address(mm)
        size = len(mm)
        assert base is not None
        if pagecache.resident(base, 0, size, samples=3):
            pytest.skip("this file system keeps the pages (tmpfs?)")
        assert not pagecache.resident(base, 0, size)
        bytes(mm[:])  # read every page
        assert pagecache.resident(base, 0, size) and pagecache.resident(base, 0, size, samples=3)
        mm.close()
