"""Scale benchmark: time and peak memory of LATA merges of multi-GB checkpoints, against mergekit.

    python benchmarks/scale.py --size 135m --mergekit /path/to/mergekit-yaml --check
    python benchmarks/scale.py --size 1.1b --mergekit /path/to/mergekit-yaml --mergekit-methods ta
    python benchmarks/scale.py --size 1.1b --cold --weightings linear_rank
    python benchmarks/scale.py --size 1.1b --digests --repeats 3

1. Writes (once, reused afterwards) a Llama-shaped family under ``--work-dir/<size>/``: base
   (random, initialiser-like), instruct = base + small noise, and two experts = instruct + a
   share of the instruction vector that fades with depth + low-rank task deltas that grow with
   depth + noise, so layer similarities are meaningful (early layers instruction-like).
2. Measures the I/O floor in a fresh process: read every input file once (plain reads) and
   write one output of the merged model's size, once through the page cache and once with
   O_DIRECT; the floor takes the faster write. Warm cache by default (every run starts after
   an untimed read of all inputs); ``--cold`` instead evicts the inputs from the page cache
   (posix_fadvise DONTNEED on our own files, no root needed) before the floor and every run.
3. Runs every merge in a fresh subprocess, alternating mergekit and lata per method, and reads
   wall time, CPU time and peak resident memory (ru_maxrss from wait4: the process and its
   children, file-backed mapped pages included) for each; prints the ratios lata/mergekit.

Each lata run goes through the ``lata`` CLI (``--via cli``, the default: model=paths,
benchmark=none, save_model=..., a fresh cache so the layer analysis is computed every time) or
through the library in ``python -c`` (``--via library``). mergekit runs ``mergekit-yaml``
(installed in its own virtual environment) with ``merge_method: task_arithmetic`` / ``ties``,
``base_model`` = instruct, weight 1 (= lambda) and the same density, arithmetic in float32
(``dtype: float32``), output in the inputs' dtype, ``--lazy-unpickle``, one output shard size
equal to lata's. ``--check`` compares lata's uniform-weighted output with mergekit's.
``--omp-threads N`` sets OMP_NUM_THREADS/MKL_NUM_THREADS for every run of both tools;
``--threads N`` sets lata's slice workers (``threads=N``; default one per core); ``--device cuda``
makes lata compute on a GPU (``device=cuda``) and gives mergekit ``--cuda``. ``--sweep-lams
0.4,0.7,1.0`` also times one ``lata -m merge.lam=...`` per method and weighting: the points of
a sweep share one process, the layer analysis and the TIES selections (mergekit has no sweep:
it would run once per lambda). ``--digests`` times only the content digests of the inputs that
key every run (``digest_cost``): a sweep's first point and its later points, against the read
floor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SHAPES = {
    # SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads, vocab 49152, tied
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, dtype="float32"),
    # TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16"),
    # Llama-3.2-3B: hidden 3072, intermediate 8192, 28 layers, 24 heads, 8 kv heads, vocab 128256, tied
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, dtype="bfloat16"),
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 kv heads, vocab 128256
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, dtype="bfloat16"),
    # a small shape for trying the script itself
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, dtype="float32"),
}
ROLES = ("base", "instruct", "math", "code")
EXPERTS = ("math", "code")
ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
GENERATOR_VERSION = 1


def _kernels_label(in_bytes: int, device: str) -> str:
    """Which path lata's merges take here (lata.accel.kernels): numba, or torch and why."""
    from lata.accel import kernels

    if not kernels.available():
        return "torch path (numba off or missing)"
    if not kernels.worthwhile(in_bytes, device):
        return f"torch path (family under {kernels.MIN_BYTES / 1e9:.0f} GB, or not on the CPU)"
    return "numba"


# --------------------------------------------------------------------------- the family

def tensor_specs(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    specs = [("model.embed_tokens.weight", (shape["vocab_size"], h))]
    for l in range(L):
        p = f"model.layers.{l}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    specs.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (shape["vocab_size"], h)))
    return specs


def llama_config(shape: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"], "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"], "vocab_size": shape["vocab_size"],
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": shape["tie_word_embeddings"], "torch_dtype": shape["dtype"],
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def family_tensors(name: str, shape: tuple[int, ...], num_layers: int, seed: int, device: str = "cpu"):
    """float32 tensors of one parameter for base, instruct, math, code (deterministic per tensor
    and generating device), on ``device``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    torch_randn = torch.randn

    def randn(*size, generator):
        return torch_randn(*size, generator=generator, device=device)
    layer = _layer_of(name)
    depth = 0.5 if layer is None else layer / max(1, num_layers - 1)  # 0 = first block, 1 = last
    if len(shape) == 1:  # norms
        base = 1.0 + 0.05 * randn(shape, generator=g)
    else:
        base = 0.02 * randn(shape, generator=g)
    instr = 0.002 * randn(shape, generator=g)
    instruct = base + instr
    out = {"base": base, "instruct": instruct}
    for k in EXPERTS:
        # the instruction direction, strong early; a low-rank task delta, strong late; noise
        share = 0.6 * (1.0 - depth)
        scale = 0.0005 + 0.003 * depth
        if len(shape) == 2:
            rank = 4
            a = randn(shape[0], rank, generator=g)
            b = randn(rank, shape[1], generator=g)
            task = (a @ b) * (scale / math.sqrt(rank))
        else:
            task = scale * randn(shape, generator=g)
        task += 0.0005 * randn(shape, generator=g)
        out[k] = instruct + share * instr + task
    return out


def write_family(root: Path, size: str, device: str = "cpu") -> dict[str, Path]:
    """The four checkpoints under ``root`` (skipped when a complete copy with the same recipe
    exists), generated on ``device`` (a GPU is much faster; its random numbers differ from the
    CPU's, so the recipe names the device unless it is the CPU)."""
    import torch

    shape = SHAPES[size]
    stamp = root / "family.json"
    recipe = {"size": size, "shape": shape, "version": GENERATOR_VERSION,
              **({"generated_on": torch.device(device).type} if torch.device(device).type != "cpu" else {})}
    dirs = {r: root / r for r in ROLES}
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return dirs
    if root.exists():
        shutil.rmtree(root)
    dtype = getattr(torch, shape["dtype"])
    specs = tensor_specs(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    files = {}
    for role, d in dirs.items():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
        files[role] = open(d / "model.safetensors", "wb")
        _write_header(files[role], [(n, s, ST_DTYPE[shape["dtype"]], itemsize) for n, s in specs])
    t0 = time.perf_counter()
    for i, (name, tshape) in enumerate(specs):
        tensors = family_tensors(name, tshape, shape["num_hidden_layers"], seed=1000 + i, device=device)
        for role in ROLES:
            files[role].write(tensors[role].to(dtype).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for f in files.values():
        f.close()
    os.sync()
    stamp.write_text(json.dumps(recipe))
    print(f"wrote the {size} family to {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return dirs


def family_dir(size: str, device: str = "cpu") -> str:
    """The family's directory name under the work directory (one per generating device type)."""
    kind = device.split(":")[0]
    return size if kind == "cpu" else f"{size}-{kind}"


def model_bytes(size: str) -> int:
    import torch

    shape = SHAPES[size]
    itemsize = torch.empty((), dtype=getattr(torch, shape["dtype"])).element_size()
    return sum(math.prod(s) for _, s in tensor_specs(shape)) * itemsize


def check_disk(root: Path, size: str) -> None:
    """Stop before writing anything where the work directory's file system has no room for the
    family (four models, unless already written) plus two outputs (a merge's, and the floor's
    or mergekit's)."""
    model = model_bytes(size)
    have = (root / "family.json").is_file()
    need = (0 if have else len(ROLES) * model) + 2 * model
    probe = root if root.exists() else next(p for p in root.parents if p.exists())
    free = shutil.disk_usage(probe).free
    if free < need * 1.05:
        what = "2 outputs" if have else "the family of 4 models and 2 outputs"
        sys.exit(f"--size {size}: needs {need / 1e9:.1f} GB free under {probe} ({what} of {model / 1e9:.1f} GB "
                 f"each), has {free / 1e9:.1f} GB; use --work-dir elsewhere or a smaller --size")


def _write_header(f, entries) -> None:
    """A safetensors header for tensors written afterwards in this order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, st_dtype, itemsize in entries:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)


# --------------------------------------------------------------------------- running and measuring

@dataclass
class Result:
    label: str
    wall_s: float
    maxrss_mb: float
    cpu_s: float
    load_before: float
    rc: int
    points: int = 1  # a multirun (--sweep-lams): its points, all in this one run


def evict(paths: list[Path]) -> None:
    """Drop our own files' clean pages from the page cache (cold-cache runs)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(label: str, argv: list[str], log: Path, env: dict | None = None, quiet: bool = False) -> Result:
    """Run ``argv`` as a fresh process; wall time and its (and its children's) peak RSS."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = Result(label, wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, load, proc.returncode)
    if not quiet:
        state = "ok" if result.rc == 0 else f"FAILED rc={result.rc} (see {log})"
        print(f"  {label:<34} {wall:8.2f} s  {result.maxrss_mb:8.0f} MB peak RSS  {result.cpu_s:7.1f} s CPU  "
              f"(load {load:.2f}) {state}", flush=True)
    return result


FLOOR = r"""
import mmap, os, sys, time
mode, out, nbytes, inputs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
view = memoryview(buf)
t0 = time.perf_counter()
for path in inputs:
    with open(path, 'rb', buffering=0) as f:
        while f.readinto(view):
            pass
t1 = time.perf_counter()
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == 'direct' else 0), 0o644)
left = nbytes - nbytes % 4096 if mode == 'direct' else nbytes
while left:
    left -= os.write(fd, view[:min(left, len(view))])
os.close(fd)
t2 = time.perf_counter()
print(f'{t1 - t0:.3f} {t2 - t1:.3f}')
"""


def floor(inputs: list[Path], out: Path, nbytes: int, mode: str) -> tuple[float, float]:
    """(read s, write s): read every input once (plain reads), write ``nbytes`` (``mode``:
    buffered, through the page cache, or direct, O_DIRECT) in a fresh process."""
    t = subprocess.run([sys.executable, "-c", FLOOR, mode, str(out), str(nbytes), *map(str, inputs)],
                       capture_output=True, text=True, check=True).stdout.split()
    out.unlink()
    return float(t[0]), float(t[1])


def warm(inputs: list[Path]) -> None:
    """Read every input once (untimed), so each run starts with them in the page cache."""
    buf = bytearray(16 << 20)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


LIBRARY = r"""
import sys
from lata import Family, MergeConfig, WeightingConfig, plan_merge, merge_to_dir
from lata.analysis import layer_similarities
base, instruct, math_, code, out, method, weighting, density, threads, device, staged = sys.argv[1:12]
family = Family.open(base, instruct, {"math": math_, "code": code})
options = {"density": float(density)} if method == "ties" else {}
threads = None if threads == "auto" else int(threads)
staged = {"auto": None, "on": True, "off": False}[staged]
analysis = layer_similarities(family, device=device, progress=False, threads=threads, staged=staged)
plan = plan_merge(family, MergeConfig(method=method, **options), WeightingConfig(name=weighting),
                  progress=False, threads=threads, device=device, analysis=analysis)
plan = plan.with_options(staged=staged)
merge_to_dir(plan, out, overwrite=True, progress=False)
"""


def lata_argv(via: str, dirs: dict, out: Path, method: str, weighting: str, density: float, run_dir: Path,
              shard_size: str, threads: int | None = None, device: str = "cpu",
              lams: list[str] | None = None, staged: str = "auto") -> list[str]:
    """The lata command of one run; with ``lams``, one multirun over those lambdas (CLI only:
    every point in one process, each written to ``out/<job number>``)."""
    if via == "library":
        return [sys.executable, "-c", LIBRARY, *(str(dirs[r]) for r in ROLES), str(out), method, weighting,
                str(density), str(threads or "auto"), device, staged]
    points = ([f"merge.lam={','.join(lams)}", f"save_model={out}/${{hydra:job.num}}", f"hydra.sweep.dir={run_dir}"]
              if lams else [f"save_model={out}", f"hydra.run.dir={run_dir}"])
    return [sys.executable, "-m", "lata", *(["-m"] if lams else []), "model=paths", f"++model.base={dirs['base']}",
            f"++model.instruct={dirs['instruct']}", f"++model.experts.math={dirs['math']}",
            f"++model.experts.code={dirs['code']}", f"merge={method}", f"weighting={weighting}",
            *([f"merge.density={density}"] if method == "ties" else []), "benchmark=none",
            "overwrite=true", "progress=false", f"shard_size={shard_size}",
            *([f"threads={threads}"] if threads else []), f"device={device}", *points]


def mergekit_config(dirs: dict, method: str, density: float, dtype: str) -> dict:
    params = {"weight": 1.0, **({"density": density} if method == "ties" else {})}
    config = {
        "merge_method": "task_arithmetic" if method == "ta" else "ties",
        "base_model": str(dirs["instruct"]),
        "models": [{"model": str(dirs[k]), "parameters": dict(params)} for k in EXPERTS],
        "dtype": "float32",  # arithmetic in float32, as lata does
        "out_dtype": dtype,
    }
    if method == "ties":
        config["parameters"] = {"normalize": True}  # the disjoint mean
    return config


def mergekit_argv(exe: str, config: Path, out: Path, shard_params: int, device: str = "cpu") -> list[str]:
    return [exe, str(config), str(out), "--lazy-unpickle", "--no-copy-tokenizer", "--no-write-model-card",
            "--quiet", f"--out-shard-size={shard_params}", *(["--cuda"] if device.startswith("cuda") else [])]


@dataclass
class Comparison:
    tensors: int  # tensors in both checkpoints
    identical: int  # of them, equal bit for bit (and in dtype)
    max_abs: float  # largest |a - b|
    differing: float  # fraction of the values that differ


def compare_outputs(a: Path, b: Path) -> Comparison:
    """Two checkpoints compared tensor by tensor (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        idx = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                idx.update({n: f for n in h.keys()})
        return idx

    ia, ib = index(a), index(b)
    names = sorted(set(ia) & set(ib))
    identical, worst, differing, values = 0, 0.0, 0, 0
    for name in names:
        with safe_open(str(ia[name]), "pt") as ha, safe_open(str(ib[name]), "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        identical += x.dtype == y.dtype and torch.equal(x, y)
        x, y = x.double(), y.double()
        worst = max(worst, float((x - y).abs().max()))
        differing, values = differing + int((x != y).sum()), values + x.numel()
    missing = set(ia) ^ set(ib)
    if missing:
        print(f"  tensors in only one output: {sorted(missing)[:3]}")
    return Comparison(len(names), identical, worst, differing / max(values, 1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SHAPES), default="135m")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lata-scale",
                    help="where the families and outputs go (not the repository; 1.1b needs ~12 GB)")
    ap.add_argument("--mergekit", help="path to mergekit-yaml (in its own virtual environment)")
    ap.add_argument("--methods", default="ta,ties", help="comma-separated: ta, ties")
    ap.add_argument("--mergekit-methods", help="the methods mergekit also runs (default: all of --methods)")
    ap.add_argument("--weightings", default="uniform,linear_rank", help="lata weightings to time")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--via", choices=["cli", "library"], default="cli")
    ap.add_argument("--shard-size", default="2GB", help="lata shard_size (mergekit gets the same in parameters)")
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before each run")
    ap.add_argument("--check", action="store_true", help="compare lata (uniform) and mergekit outputs")
    ap.add_argument("--omp-threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS for every run (both tools)")
    ap.add_argument("--threads", type=int, help="lata's slice workers (default: lata's own, one per core)")
    ap.add_argument("--device", default="cpu", help="where both tools compute: cpu, cuda, cuda:N (mergekit: --cuda)")
    ap.add_argument("--sweep-lams", help="also time, per method and weighting, one lata multirun over these "
                                         "comma-separated lambdas (one process; CLI only)")
    ap.add_argument("--staged", choices=["auto", "on", "off"], default="auto",
                    help="lata's staged path (whole tensors read ahead onto the device; lata.accel.transfer): "
                         "auto = on an accelerator only; on/off need --via library")
    ap.add_argument("--gen-device", default="cpu", help="where the synthetic family is generated (cuda: much "
                    "faster; a different family from the CPU's, written to its own directory)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--digests", action="store_true",
                    help="only time the content digests every lata run takes of its inputs (lata.run.fingerprints): "
                         "a sweep's first point (nothing remembered) and its later points (remembered), against "
                         "the read floor; --cold evicts the inputs first")
    args = ap.parse_args(argv)
    if args.sweep_lams and args.via != "cli":
        ap.error("--sweep-lams times the lata CLI's multirun: it needs --via cli")
    if args.staged != "auto" and args.via != "library":
        ap.error("--staged on/off is a library setting: it needs --via library")
    lams = [x for x in (args.sweep_lams or "").split(",") if x]
    if args.omp_threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.omp_threads)

    import torch

    shape = SHAPES[args.size]
    root = args.work_dir / family_dir(args.size, args.gen_device)
    check_disk(root, args.size)
    dirs = write_family(root, args.size, args.gen_device)
    inputs = sorted(p for r in ROLES for p in dirs[r].glob("*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in inputs)
    itemsize = torch.empty((), dtype=getattr(torch, shape["dtype"])).element_size()
    out_bytes = sum(math.prod(s) for _, s in tensor_specs(shape)) * itemsize
    from lata.config import parse_size
    shard_params = parse_size(args.shard_size) // itemsize
    print(f"{args.size}: {len(tensor_specs(shape))} tensors, {shape['dtype']}, inputs {in_bytes / 1e9:.2f} GB "
          f"in {len(inputs)} files, output {out_bytes / 1e9:.2f} GB; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({os.environ.get('OMP_NUM_THREADS', 'default')} OMP threads, "
          f"lata threads {args.threads or 'auto'}, device {args.device}, "
          f"kernels {_kernels_label(in_bytes, args.device)}); "
          f"cache: {'cold' if args.cold else 'warm'}",
          flush=True)

    runs_dir = args.work_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.digests:
        digest_cost(dirs, inputs, in_bytes, runs_dir, args.repeats, args.cold)
        return
    results: list[Result] = []
    floors: list[tuple[float, float, float]] = []
    methods = [m for m in args.methods.split(",") if m]
    weightings = [w for w in args.weightings.split(",") if w]
    outs = {}
    fresh_env = lambda tag: {**os.environ, "LATA_CACHE": str(runs_dir / f"cache-{tag}"),
                             "LATA_RESULTS": str(runs_dir / f"cache-{tag}" / "results")}
    dry_run = [*lata_argv("cli", dirs, runs_dir / "unused", "ta", "uniform", args.density, runs_dir / "hydra-dry",
                          args.shard_size, device=args.device), "dry_run=true"]
    # best of two: the first start of a fresh environment also compiles its modules
    starts = {"lata": min(measure("", dry_run, runs_dir / "startup-lata.log", fresh_env("dry-run"), quiet=True).wall_s
                          for _ in range(2))}
    if args.mergekit:
        starts["mergekit"] = min(measure("", [args.mergekit, "--help"], runs_dir / "startup-mergekit.log",
                                         quiet=True).wall_s for _ in range(2))
    print("startup, nothing merged (best of 2): " + ", ".join(f"{k} {v:.2f} s" for k, v in starts.items())
          + "  (lata: CLI dry run, headers only" + ("; mergekit: --help)" if args.mergekit else ")"), flush=True)
    for rep in range(args.repeats):
        if args.cold:
            evict(inputs)
        r1, w1 = floor(inputs, runs_dir / "floor.bin", out_bytes, "buffered")
        if args.cold:
            evict(inputs)
        r2, w2 = floor(inputs, runs_dir / "floor.bin", out_bytes, "direct")
        floors.append((min(r1, r2), w1, w2))
        print(f"[{rep + 1}/{args.repeats}] floor: read {in_bytes / 1e9:.2f} GB in {min(r1, r2):.2f} s "
              f"({in_bytes / 1e9 / min(r1, r2):.2f} GB/s); write {out_bytes / 1e9:.2f} GB in {w1:.2f} s buffered, "
              f"{w2:.2f} s O_DIRECT", flush=True)
        for method in methods:
            jobs = []
            mk_methods = (args.mergekit_methods or args.methods).split(",")
            if args.mergekit and method in mk_methods:
                cfg = runs_dir / f"mergekit-{method}.yaml"
                cfg.write_text(json.dumps(mergekit_config(dirs, method, args.density, shape["dtype"]), indent=2))
                out = runs_dir / f"out-mergekit-{method}"
                jobs.append((f"mergekit {method}", "mergekit", out,
                             mergekit_argv(args.mergekit, cfg, out, shard_params, args.device), 1))
            for weighting in weightings:
                out = runs_dir / f"out-lata-{method}-{weighting}"
                jobs.append((f"lata {method} + {weighting}", f"lata-{weighting}", out,
                             lata_argv(args.via, dirs, out, method, weighting, args.density,
                                       runs_dir / f"hydra-{method}-{weighting}", args.shard_size, args.threads,
                                       args.device, staged=args.staged), 1))
                if lams:
                    out = runs_dir / f"out-lata-{method}-{weighting}-sweep"
                    shutil.rmtree(runs_dir / f"hydra-{method}-{weighting}-sweep", ignore_errors=True)
                    jobs.append((f"lata {method} + {weighting}, {len(lams)} lambdas", f"lata-{weighting}-x{len(lams)}",
                                 out, lata_argv("cli", dirs, out, method, weighting, args.density,
                                                runs_dir / f"hydra-{method}-{weighting}-sweep", args.shard_size,
                                                args.threads, args.device, lams), len(lams)))
            for label, tag, out, cmd, points in jobs:
                if out.exists():
                    shutil.rmtree(out)
                env = None
                if tag != "mergekit":  # a fresh cache: the layer analysis is computed in every run, not reused
                    shutil.rmtree(runs_dir / f"cache-{tag}-{method}", ignore_errors=True)
                    env = fresh_env(f"{tag}-{method}")
                os.sync()  # the previous run's writeback is not charged to this one
                if args.cold:
                    evict(inputs)
                else:
                    warm(inputs)
                res = measure(label, cmd, runs_dir / f"{tag}-{method}.log", env=env)
                res.label = f"{method}: " + ("mergekit" if tag == "mergekit" else f"lata {tag[5:]}".replace("-x", " x"))
                res.points = points
                results.append(res)
                outs[(method, tag)] = out
            if args.check and args.mergekit and (method, "lata-uniform") in outs:
                diff = compare_outputs(outs[(method, "lata-uniform")], outs[(method, "mergekit")]).max_abs
                print(f"  {method}: max |lata uniform - mergekit| = {diff:.3g}", flush=True)
            for key in [k for k in outs if k[0] == method]:
                shutil.rmtree(outs.pop(key), ignore_errors=True)

    read_s = min(f[0] for f in floors)
    write_buffered, write_direct = min(f[1] for f in floors), min(f[2] for f in floors)
    floor_s = read_s + min(write_buffered, write_direct)
    print(f"\nsummary: {args.size} ({shape['dtype']}), {'cold' if args.cold else 'warm'} cache, best of {args.repeats}; "
          f"floor {floor_s:.2f} s = read {read_s:.2f} + write {min(write_buffered, write_direct):.2f} "
          f"(buffered {write_buffered:.2f}, O_DIRECT {write_direct:.2f}); load average before the runs "
          f"{min(r.load_before for r in results):.2f}-{max(r.load_before for r in results):.2f}")
    best: dict[str, Result] = {}
    for r in results:
        if r.rc == 0 and (r.label not in best or r.wall_s < best[r.label].wall_s):
            best[r.label] = r
    print(f"{'run':<26} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>12} {'x floor':>8} {'time/mk':>8} {'RSS/mk':>7} "
          f"{'- start':>8} {'x floor':>8} {'time/mk':>8}")
    started = lambda label, r: r.wall_s - starts["mergekit" if label.endswith("mergekit") else "lata"]
    for label, r in best.items():
        method = label.split(":")[0]
        mk = best.get(f"{method}: mergekit")
        ratio_t = f"{r.wall_s / mk.wall_s:.2f}" if mk else "-"
        ratio_m = f"{r.maxrss_mb / mk.maxrss_mb:.2f}" if mk else "-"
        after = started(label, r)
        ratio_a = f"{after / started(f'{method}: mergekit', mk):.2f}" if mk else "-"
        print(f"{label:<26} {r.wall_s:8.2f} {r.cpu_s:7.1f} {r.maxrss_mb:12.0f} {r.wall_s / floor_s:8.2f} "
              f"{ratio_t:>8} {ratio_m:>7} {after:8.2f} {after / floor_s:8.2f} {ratio_a:>8}")
    print("(- start: the wall time less the tool's startup, nothing merged)")
    for label, r in best.items():
        if r.points > 1:  # a multirun: what one point of it costs
            print(f"{label}: {r.wall_s / r.points:.2f} s a point ({r.wall_s / r.points / floor_s:.2f} x floor), "
                  f"the first included; one process for all {r.points}")
    failed = [r.label for r in results if r.rc != 0]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "cache": "cold" if args.cold else "warm",
                                         "omp_threads": args.omp_threads, "threads": args.threads,
                                         "floor": {"read_s": read_s, "write_buffered_s": write_buffered,
                                                   "write_direct_s": write_direct},
                                         "startup_s": starts, "runs": [r.__dict__ for r in results]}, indent=2))


DIGESTS = r"""
import json, sys, time
t0 = time.perf_counter()
from lata.io import digests
from lata.run.fingerprints import checkpoint_digest
digests.use_memo_dir(sys.argv[1])
t1 = time.perf_counter()
keys = [checkpoint_digest(path) for path in sys.argv[2:]]
print(json.dumps({"import_s": t1 - t0, "digest_s": time.perf_counter() - t1, "keys": keys}))
"""


def digest_cost(dirs: dict, inputs: list[Path], in_bytes: int, runs_dir: Path, repeats: int, cold: bool) -> None:
    """The content digests of the family's four checkpoints, each in a fresh process: with an
    empty memo (a sweep's first point, or any run after the inputs changed: every byte read and
    hashed) and with the memo the first wrote (every later point: a stat per file), against
    the read floor measured in the same run."""
    memo = runs_dir / "digest-memo"
    rows = []
    for rep in range(repeats):
        if cold:
            evict(inputs)
        read_s, _ = floor(inputs, runs_dir / "floor.bin", 0, "buffered")
        shutil.rmtree(memo, ignore_errors=True)
        time.sleep(2.1)  # files written by the generator just now are outside the racy window by then
        runs = []
        for _ in ("first", "later"):
            if cold:
                evict(inputs)
            out = subprocess.run([sys.executable, "-c", DIGESTS, str(memo), *(str(dirs[r]) for r in ROLES)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if runs[0]["keys"] != runs[1]["keys"]:
            raise SystemExit("the remembered digests differ from the computed ones")
        rows.append((read_s, runs[0]["digest_s"], runs[1]["digest_s"]))
        print(f"[{rep + 1}/{repeats}] read floor {read_s:.2f} s ({in_bytes / 1e9 / read_s:.2f} GB/s); digests: first "
              f"point {runs[0]['digest_s']:.2f} s ({in_bytes / 1e9 / runs[0]['digest_s']:.2f} GB/s, "
              f"{runs[0]['digest_s'] / read_s:.2f} x read floor), later points {runs[1]['digest_s'] * 1e3:.1f} ms",
              flush=True)
    best = min(rows, key=lambda r: r[1])
    print(f"\nsummary: {in_bytes / 1e9:.2f} GB in {len(inputs)} files, {'cold' if cold else 'warm'} cache, best of "
          f"{repeats}: first point {best[1]:.2f} s = {best[1] / (in_bytes / 1e9):.3f} s/GB "
          f"({best[1] / best[0]:.2f} x the read floor of {best[0]:.2f} s); later points "
          f"{min(r[2] for r in rows) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
