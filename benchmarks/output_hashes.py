"""Digests of merged outputs for every method x weighting and the engine's paths, through the
public API only: run it before and after a change that must not move a bit, and compare.

    python benchmarks/output_hashes.py --out before.json
    python benchmarks/output_hashes.py --out after.json --compare before.json

Each case merges the test family (tests/conftest.write_family: a tiny random Llama, two experts)
and records the SHA-256 of every output tensor's bytes (and of the whole directory's tensors
for ``merge_to_dir``). Cases: 8 methods x 7 weightings with the defaults, and per method the
anchor=base, per-expert lambdas, sliced-and-threaded, staged, fused-kernel, bf16-output,
state-dict and model-in-place paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import write_family  # noqa: E402

from lata import Family, MergeConfig, WeightingConfig, merge_state_dict, merge_to_dir, plan_merge  # noqa: E402
from lata import merge_into_model  # noqa: E402

METHODS = {"ta": {}, "ties": {"density": 0.3}, "dare": {"p": 0.5, "seed": 3}, "dare_ties": {"p": 0.5},
           "breadcrumbs": {"density": 0.8, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
           "della": {"density": 0.6, "epsilon": 0.2}, "della_linear": {"density": 0.6, "epsilon": 0.2}}
WEIGHTINGS = {"uniform": {}, "linear_rank": {"drop": 0.5}, "log_rank": {"drop": 0.25},
              "threshold": {"threshold": 0.9}, "lines": {"alpha": 0.3, "beta": 0.7},
              "shuffled": {"of": "log_rank", "drop": 0.5, "seed": 1},
              "explicit": {"weights": [1.0, 0.5, 0.0, 2.0]}}
RECIPE = """merge_method: ties
base_model: b
models:
  - model: x/y
    parameters:
      weight: [0.0, 1.0]
"""


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return tensor_digest(state)


def cases():
    for method, params in METHODS.items():
        for weighting, wparams in WEIGHTINGS.items():
            yield f"{method}/{weighting}", dict(method=method, params=params, weighting=weighting, wparams=wparams)
        base = dict(method=method, params=params, weighting="linear_rank", wparams={"drop": 0.5})
        yield f"{method}/anchor_base", {**base, "anchor": "base"}
        yield f"{method}/lams", {**base, "lams": {"math": 0.3, "code": 1.4}}
        yield f"{method}/sliced", {**base, "plan": {"chunk_size": 37, "threads": 2}}
        yield f"{method}/staged", {**base, "plan": {"staged": True, "chunk_size": 53}}
        yield f"{method}/fused", {**base, "fused": True}
        yield f"{method}/bf16", {**base, "out_dtype": "bfloat16"}
        yield f"{method}/state_dict", {**base, "sink": "state_dict"}
        yield f"{method}/model", {**base, "sink": "model"}
    yield "ties/global", dict(method="ties", params={"density": 0.3, "topk_scope": "global"},
                              weighting="log_rank", wparams={})
    yield "ta/from_mergekit", dict(method="ta", params={}, weighting="explicit", wparams={"from_mergekit": RECIPE})
    yield "ta/mean_rest", dict(method="ta", params={}, weighting="lines", wparams={},
                               normalize="mean", rest_weight=0.4)


def run_case(family, case, tmp: Path, name: str) -> str:
    from lata.accel import kernels

    merge = MergeConfig(method=case["method"], lam=0.7, anchor=case.get("anchor", "instruct"),
                        lams=case.get("lams", {}), **case["params"])
    wparams = dict(case["wparams"])
    if "from_mergekit" in wparams:
        recipe = tmp / "recipe.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(wparams["from_mergekit"])
        wparams["from_mergekit"] = str(recipe)
    weighting = WeightingConfig(name=case["weighting"], normalize=case.get("normalize", "none"),
                                rest_weight=case.get("rest_weight"), **wparams)
    old = kernels.MIN_BYTES
    if case.get("fused"):
        kernels.MIN_BYTES = 0
    try:
        plan = plan_merge(family, merge, weighting, progress=False)
        if case.get("plan"):
            plan = plan.with_options(**case["plan"])
        sink = case.get("sink", "dir")
        if sink == "state_dict":
            return tensor_digest(merge_state_dict(plan))
        if sink == "model":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(family.anchor("instruct").path), dtype=torch.float32)
            merge_into_model(plan, model)
            state = {k: v for k, v in model.state_dict().items()}
            return tensor_digest(state)
        out = merge_to_dir(plan, tmp / name.replace("/", "_"), out_dtype=case.get("out_dtype"), progress=False,
                           shard_size="20KB")
        return dir_digest(out)
    finally:
        kernels.MIN_BYTES = old


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_family(tmp / "family")
        family = Family.open(paths["base"], paths["instruct"], paths["experts"])
        for name, case in cases():
            digests[name] = run_case(family, case, tmp / "out", name)
        # forgetting: the code vector subtracted from a target that has it
        forget = Family.open(paths["base"], paths["instruct"], {"code": paths["experts"]["code"]},
                             target=paths["experts"]["code"])
        for method in METHODS:
            case = dict(method=method, params=METHODS[method], weighting="linear_rank", wparams={},
                        lams={"code": -1.0})
            digests[f"{method}/target"] = run_case(forget, case, tmp / "out", f"{method}/target")
    args.out.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"{len(digests)} cases -> {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = sorted(k for k in before if digests.get(k) != before[k])
        missing = sorted(set(before) ^ set(digests))
        print(f"compared with {args.compare}: {len(before) - len(differ)} of {len(before)} identical")
        for k in differ:
            print(f"  differs: {k}")
        for k in missing:
            print(f"  only on one side: {k}")
        return 1 if differ or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
