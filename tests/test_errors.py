"""Bad input: a clear error naming the file/tensor/key, raised before anything is written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_family
from lata import CheckpointError, Family, MergeConfig, WeightingConfig, merge_to_dir, plan_merge
from lata.analysis import layer_similarities
from lata.engine import _Pass


@pytest.fixture
def dirs(tmp_path):
    return write_family(tmp_path / "family")


def rewrite(path, edit):
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def open_family(d):
    return Family.open(d["base"], d["instruct"], d["experts"])


def test_expert_with_an_extra_layer_names_the_first_differing_tensor(dirs):
    rewrite(dirs["experts"]["code"], lambda s: s.update({"model.layers.4.mlp.down_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match=r"expert 'code' .* base lacks tensor 'model.layers.4.mlp.down_proj.weight' "
                                              r"\(layers: base 4, expert 'code' 5\)"):
        open_family(dirs)


def test_expert_missing_a_tensor(dirs):
    rewrite(dirs["experts"]["math"], lambda s: s.pop("model.layers.2.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match="expert 'math' lacks tensor 'model.layers.2.self_attn.q_proj.weight'"):
        open_family(dirs)


def test_shape_mismatch_names_tensor_and_shapes(dirs):
    rewrite(dirs["instruct"], lambda s: s.update({"model.norm.weight": torch.ones(17)}))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \[17\] in instruct .* but \[16\] in base"):
        open_family(dirs)


def test_different_model_types_are_refused(dirs):
    config = json.loads((dirs["base"] / "config.json").read_text())
    config["model_type"] = "mistral"
    (dirs["base"] / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="different model_type: base=mistral, instruct=llama"):
        open_family(dirs)


def test_an_architecture_whose_blocks_cannot_be_found_is_refused(dirs):
    for path in [dirs["base"], dirs["instruct"], *dirs["experts"].values()]:
        config = json.loads((path / "config.json").read_text())
        config["model_type"] = "mamba"
        del config["num_hidden_layers"]
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"base/config.json \(base\): cannot find the blocks of model_type "
                                              r"'mamba': its config gives no block count \(looked for num_hidden_layers, "
                                              r"n_layer, num_layers, n_layers, also under text_config\); "
                                              r"add lata/architectures/mamba.json$"):
        open_family(dirs)


def test_missing_directory(dirs, tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint directory {tmp_path}/nowhere does not exist"):
        Family.open(tmp_path / "nowhere", dirs["instruct"], dirs["experts"])


def test_directory_without_safetensors(dirs):
    (dirs["experts"]["math"] / "model.safetensors").rename(dirs["experts"]["math"] / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"expert 'math' checkpoint .* has no model.safetensors .*pytorch_model.bin"):
        open_family(dirs)


def test_truncated_safetensors_names_the_file(dirs):
    file = dirs["experts"]["code"] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file {file}"):
        open_family(dirs)


def test_sharded_index_pointing_to_missing_shard(tmp_path):
    d = write_family(tmp_path / "sharded", shard_size="20KB")
    shard = sorted(d["instruct"].glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}, which is missing"):
        open_family(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_file_and_tensor_and_nothing_is_written(dirs, tmp_path, bad):
    def poison(s):
        s["model.layers.1.mlp.up_proj.weight"][3, 3] = bad
    rewrite(dirs["experts"]["math"], poison)
    family = open_family(dirs)  # headers are fine
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(CheckpointError, match=rf"tensor 'model.layers.1.mlp.up_proj.weight' in .*math/model.safetensors "
                                              rf"\(expert 'math'\) contains {kind}"):
        plan_merge(family, MergeConfig(), WeightingConfig(), progress=False)


def test_a_merge_failing_half_way_leaves_no_directory(dirs, tmp_path, monkeypatch):
    plan = plan_merge(open_family(dirs), MergeConfig(), WeightingConfig(), progress=False)
    original, calls = _Pass.merged_tensor, []

    def failing(self, name):
        calls.append(name)
        if len(calls) == 10:
            raise RuntimeError("disk on fire")
        return original(self, name)

    monkeypatch.setattr(_Pass, "merged_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_to_dir(plan, tmp_path / "out", shard_size="8KB", progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "family"]  # no out, no temporary sibling


def test_lambda_for_an_unknown_expert_is_refused(dirs):
    with pytest.raises(ValueError, match="merge.lams.chem names no expert; experts are: math, code"):
        plan_merge(open_family(dirs), MergeConfig(lams={"chem": 1.0}), WeightingConfig(), progress=False)


def test_explicit_weights_of_wrong_length(dirs):
    with pytest.raises(ValueError, match="expected 4, got 2"):
        plan_merge(open_family(dirs), MergeConfig(), WeightingConfig(name="explicit", weights=[1.0, 1.0]),
                   progress=False)


def test_reserved_expert_names(dirs):
    with pytest.raises(CheckpointError, match="expert name 'base' is reserved"):
        Family.open(dirs["base"], dirs["instruct"], {"base": dirs["experts"]["math"]})


def test_a_device_torch_cannot_use_is_refused_by_name_before_any_read(dirs, monkeypatch):
    from lata.accel.compute import check_device
    from lata.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda', but this torch .* sees no CUDA device"):
        plan_merge(open_family(dirs), MergeConfig(), WeightingConfig(), device="cuda", progress=False)
    with pytest.raises(ConfigError, match=r"device='cuda', but this torch .* sees no CUDA device"):
        layer_similarities(open_family(dirs), device="cuda", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"device='cuda:2', but this machine has 2 CUDA device\(s\): cuda:0..cuda:1"):
        check_device("cuda:2")
    check_device("cuda:1")  # a device that exists passes
    check_device("cpu")
