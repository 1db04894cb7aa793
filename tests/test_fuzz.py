"""Malformed input, fuzzed: every reader of an input (a model's safetensors file, a sharded
checkpoint's index and shards, config.json, a LoRA adapter's adapter_config.json and
adapter_model.safetensors, a mergekit recipe) either accepts a damaged input or refuses it with a
CheckpointError or ConfigError whose message is one line naming the damaged file, quickly; no
other exception escapes. The damage is seeded: truncation, byte flips (in the 8-byte length, in
the JSON header, anywhere), values of the wrong type, non-regular files (FIFO, directory, device,
dangling link). The command line says such an error in one line, with exit status 2."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import LATA, family_args, recipe_weights, write_family
from lata import CheckpointError, ConfigError, Family
from lata.io.checkpoints import Checkpoint

pytestmark = pytest.mark.timeout(30)

REFUSALS = (CheckpointError, ConfigError)
SECONDS = 5.0  # the most one reader may take on a damaged input
# values of the wrong type (or range) put where a reader expects something else
WRONG = [None, True, False, -1, 0, 7, 1.5, float("nan"), 2 ** 70, "x", "", "F32", "U16", "F4", [], {}, [1],
         [-1, 2], [2, 1], [0, 2 ** 70], ["a", "b"], [[1]], [1, 2, 3], {"a": 1}, "\n"]
SPECIAL = ["fifo", "directory", "device", "dangling"]


# ---------------------------------------------------------------------------------- inputs


def write_adapter(instruct: Path, out: Path) -> Path:
    """A LoRA adapter over ``instruct`` as PEFT saves one (its files written directly): r 4, with
    down_proj at rank 2 (rank_pattern), v_proj with alpha 3 (alpha_pattern), and the embedding."""
    torch.manual_seed(7)
    with safe_open(str(instruct / "model.safetensors"), "pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        r = 2 if module.endswith("down_proj") else 4
        if module.endswith(("q_proj", "v_proj", "down_proj")):
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, shape[1]) * 0.05
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], r) * 0.05
        elif module.endswith("embed_tokens"):
            tensors[f"base_model.model.{module}.lora_embedding_A"] = torch.randn(r, shape[0]) * 0.05
            tensors[f"base_model.model.{module}.lora_embedding_B"] = torch.randn(shape[1], r) * 0.05
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "rank_pattern": {"down_proj": 2},
              "alpha_pattern": {"v_proj": 3}, "use_rslora": False, "fan_in_fan_out": False, "use_dora": False,
              "lora_bias": False, "bias": "none", "modules_to_save": None, "base_model_name_or_path": str(instruct)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


RECIPE = {"merge_method": "ties", "base_model": "org/instruct", "dtype": "float32",
          "models": [{"model": "org/math", "parameters": {"density": 0.5, "weight": [
                         {"filter": "lm_head", "value": 0.3}, {"value": [0.0, 0.5, 1.0]}]}},
                     {"model": "org/code", "parameters": {"density": 0.5}}],
          "parameters": {"normalize": True}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    family = write_family(root / "family", experts=("math",))
    sharded = write_family(root / "sharded", experts=("math",), shard_size="20KB")
    adapter = write_adapter(family["instruct"], root / "lora")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    return {"family": family, "sharded": sharded, "adapter": adapter, "recipe": recipe}


def roles(d: dict) -> dict[str, Path]:
    return {"base": d["base"], "instruct": d["instruct"], "math": d["experts"]["math"]}


def open_family(d: dict, adapter: Path | None = None) -> Family:
    family = Family.open(d["base"], d["instruct"], {"math": adapter or d["experts"]["math"]})
    for ckpt in family.inputs:  # an accepted input is read whole: a flip in the data is legal
        for name in ckpt.names:
            ckpt.get(name)
    return family


# ---------------------------------------------------------------------------------- damage


@contextlib.contextmanager
def restored(file: Path):
    """The file's bytes are put back afterwards, whatever replaced it."""
    original = file.read_bytes()
    try:
        yield
    finally:
        if file.is_dir() and not file.is_symlink():
            shutil.rmtree(file)
        elif os.path.lexists(file):
            file.unlink()
        file.write_bytes(original)


def make_special(file: Path, kind: str) -> None:
    file.unlink()
    if kind == "fifo":
        os.mkfifo(file)
    elif kind == "directory":
        file.mkdir()
    elif kind == "device":
        file.symlink_to("/dev/zero")
    else:
        file.symlink_to(file.parent / "nowhere")


def flip(data: bytearray, rng: random.Random, lo: int, hi: int, count: int) -> None:
    for _ in range(count):
        i = rng.randrange(lo, hi)
        data[i] ^= 1 << rng.randrange(8)


def header_of(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header: dict, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + rest


SAFETENSORS_DAMAGE = ["truncate", "flip_length", "flip_header", "flip_anywhere", "digit", "wrong_type",
                      "length_value", "append", "special"]


def damage_safetensors(file: Path, rng: random.Random, kind: str) -> str:
    """Damage a safetensors file in place; returns what was done."""
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "truncate":
        cut = rng.choice([0, 3, 8, 9, rng.randrange(8, 8 + n), rng.randrange(8 + n, len(data))])
        data = data[:cut]
    elif kind == "flip_length":
        flip(data, rng, 0, 8, rng.randint(1, 3))
    elif kind == "flip_header":
        flip(data, rng, 8, 8 + n, rng.randint(1, 3))
    elif kind == "flip_anywhere":
        flip(data, rng, 0, len(data), rng.randint(1, 4))
    elif kind == "digit":  # another number in the header: offsets and shapes
        digits = [i for i in range(8, 8 + n) if chr(data[i]).isdigit()]
        for i in rng.sample(digits, rng.randint(1, 2)):
            data[i] = ord(rng.choice("0123456789"))
    elif kind == "wrong_type":
        header, rest = header_of(bytes(data))
        names = [k for k in header if k != "__metadata__"]
        name = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets", "entry", "__metadata__", "header", "name"])
        value = rng.choice(WRONG)
        if field == "entry":
            header[name] = value
        elif field == "__metadata__":
            header["__metadata__"] = rng.choice([value, {"format": value}])
        elif field == "header":
            header = rng.choice([[header], "header", 1, None])
        elif field == "name":
            header[rng.choice(["a\nb", "x\r", "\u2028", "tab\t"])] = header.pop(name)
        else:
            header[name][field] = value
        data = bytearray(with_header(header, rest))
    elif kind == "length_value":
        value = rng.choice([2 ** 64 - 1, 2 ** 63, 2 ** 32, 100_000_001, len(data), len(data) - 7, 0, 1, n + 1, n - 1])
        data[:8] = struct.pack("<Q", value)
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        special = SPECIAL[rng.randrange(len(SPECIAL))]
        make_special(file, special)
        return f"{file} made a {special}"
    file.write_bytes(bytes(data))
    return f"{kind} of {file}"


def check(read, file: Path, what: str) -> str | None:
    """Run a reader on a damaged input: None where it accepts it, else its refusal's message,
    which must be one line naming the damaged file (or its checkpoint directory, for an
    incompatibility between checkpoints); any other exception escapes (and fails the test).
    Where the file is no longer a regular file, it must be refused, naming the file and what
    it is."""
    start = time.monotonic()
    special = not os.path.isfile(file)
    try:
        read()
        message = None
    except REFUSALS as exc:
        message = str(exc)
        assert message.strip() and message.splitlines() == [message], f"{what}: not one line: {message!r}"
        assert str(file) in message or str(file.parent) in message, f"{what}: does not name {file}: {message}"
        if special:
            assert str(file) in message and any(why in message for why in (
                "FIFO", "directory", "not a regular file", "No such file")), f"{what}: {message}"
    assert message is not None or not special, f"{what}: accepted"
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS, f"{what}: took {elapsed:.1f} s"
    return message


# ---------------------------------------------------------------------------------- readers


def test_the_undamaged_inputs_are_accepted(inputs):
    open_family(inputs["family"])
    open_family(inputs["sharded"])
    family = open_family(inputs["family"], adapter=inputs["adapter"])
    assert family.experts["math"].loras  # read as an adapter
    assert recipe_weights(inputs["recipe"], 3) == pytest.approx([0.0, 0.5, 1.0])


def test_names_keep_safetensors_order(inputs):
    for d in (inputs["family"], inputs["sharded"]):
        ckpt = Checkpoint(d["instruct"])
        expected = []
        for file in sorted(set(ckpt.files.values())):
            with safe_open(str(file), "pt") as handle:
                expected += [name for name in handle.keys() if ckpt.files[name] == file]
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    assert (tuple(piece.get_shape()), piece.get_dtype()) == (ckpt.shape(name), ckpt.dtype_name(name))
                    assert torch.equal(handle.get_tensor(name), ckpt.get(name))
        assert ckpt.names == expected


def test_every_dtype_reads_as_safetensors_reads_it(tmp_path):
    from lata.io.tensorfiles import read_header, read_tensor

    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
              torch.uint64, torch.complex64, torch.float8_e8m0fnu]
    tensors = {str(dtype).removeprefix("torch."): (torch.arange(6).reshape(2, 3) * 3).to(dtype) for dtype in dtypes}
    tensors["empty"] = torch.zeros(0, 3)
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    entries = read_header(tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert ckpt.names == list(handle.keys()) == list(entries)
        for name in handle.keys():
            expected = handle.get_tensor(name)
            assert ckpt.dtype_name(name) == handle.get_slice(name).get_dtype(), name
            assert ckpt.nbytes(name) == expected.numel() * expected.element_size(), name
            later, reads = ckpt.read_later(name)
            for read in reads:
                read()
            for got in (ckpt.get(name), later, read_tensor(ckpt.files[name], name, entries[name])):
                assert got.dtype == expected.dtype and got.shape == expected.shape, name
                assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("seed", range(36))
def test_a_damaged_model_file(inputs, seed):
    rng = random.Random(seed)
    d = inputs["family"]
    file = roles(d)[rng.choice(["base", "instruct", "math"])] / "model.safetensors"
    with restored(file):
        what = damage_safetensors(file, rng, SAFETENSORS_DAMAGE[seed % len(SAFETENSORS_DAMAGE)])
        check(lambda: open_family(d), file, what)


@pytest.mark.parametrize("header, message", [
    (b"{}", None),
    (b'{"__metadata__": {"format": "pt"}}', None),
    (b"[]", "its header is a JSON list, not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [4, 8]}}', "the key 'a' appears twice"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "tensor 'a': its bytes start at 4"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [4, 8]}}', "overlap"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "its tensors hold 4 bytes of data, but 8"),
    (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', "hold 8 bytes, but shape [3] of F32 needs 12"),
    (b'{"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}}',
     "needs more than 2**64 bytes"),
    (b'{"a": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}}', "dtype 'F4' is not one LATA reads"),
    (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "shape [-2] is not a list of non-negative"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}}', "lie outside the 8 bytes of data"),
    (b'{"a\\nb": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "tensor name 'a\\nb' is not printable"),
    (b'{"__metadata__": {"format": 1}}', "its __metadata__ is {'format': 1}, not an object of strings"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid UTF-8 JSON"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "not valid UTF-8 JSON"),
    (b'{"\xff": 1}', "not valid UTF-8 JSON"),
])
def test_a_safetensors_header_is_checked_as_safetensors_checks_it(tmp_path, header, message):
    from lata.io.tensorfiles import read_header

    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8 if b'"a' in header else 0))
    if message is None:
        read_header(file)
        return
    with pytest.raises(CheckpointError) as caught:
        read_header(file)
    assert message in str(caught.value) and f"cannot read safetensors file {file}: " in str(caught.value)
    assert str(caught.value).splitlines() == [str(caught.value)]


@pytest.mark.parametrize("length", [2 ** 64 - 1, 100_000_001, 50])
def test_a_header_length_past_the_file_is_refused_without_reading(tmp_path, length):
    from lata.io.tensorfiles import read_header

    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", length) + b"{}")
    with pytest.raises(CheckpointError, match=f"header length of {length} bytes, (more than the 100000000 "
                                              f"safetensors allows|but 2 follow)"):
        read_header(file)


SHARD_NAMES = ["../base/model.safetensors", "../../../other/model.safetensors", "/etc/passwd", "", ".", "..",
               "a/../../x.safetensors", "missing.safetensors", "sub/../model-00001-of-00003.safetensors",
               "model-00001-of-00003.safetensors\x00", "./model-00002-of-00003.safetensors", "config.json",
               "model.safetensors.index.json"]
INDEX_DAMAGE = ["truncate", "flip", "whole", "weight_map", "entry", "shard_name", "special", "shard", "tensor"]


@pytest.mark.parametrize("seed", range(36))
def test_a_damaged_sharded_checkpoint(inputs, seed):
    rng = random.Random(1000 + seed)
    d = inputs["sharded"]
    folder = roles(d)[rng.choice(["base", "instruct", "math"])]
    index = folder / "model.safetensors.index.json"
    kind = INDEX_DAMAGE[seed % len(INDEX_DAMAGE)]
    if kind == "shard":  # a shard damaged as a model file
        file = rng.choice(sorted(folder.glob("model-*.safetensors")))
        with restored(file):
            what = damage_safetensors(file, rng, rng.choice(SAFETENSORS_DAMAGE))
            check(lambda: open_family(d), file, what)
        return
    with restored(index):
        data = bytearray(index.read_bytes())
        content = json.loads(data)
        names = sorted(content["weight_map"])
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        elif kind == "flip":
            flip(data, rng, 0, len(data), rng.randint(1, 3))
        elif kind == "whole":
            data = bytearray(json.dumps(rng.choice([[content], 1, "index", None, {}, {"weight_map": None}])).encode())
        elif kind == "weight_map":
            content["weight_map"] = rng.choice(WRONG)
        elif kind == "entry":
            content["weight_map"][rng.choice(names)] = rng.choice(WRONG)
        elif kind == "shard_name":
            content["weight_map"][rng.choice(names)] = rng.choice(SHARD_NAMES)
        elif kind == "tensor":  # a tensor the shard does not hold, or an odd name
            content["weight_map"][rng.choice(["nothing.weight", "a\nb", "\u2028"])] = content["weight_map"][names[0]]
        if kind in ("weight_map", "entry", "shard_name", "tensor"):
            data = bytearray(json.dumps(content).encode())
        if kind == "special":
            make_special(index, SPECIAL[rng.randrange(len(SPECIAL))])
        else:
            index.write_bytes(bytes(data))
        check(lambda: open_family(d), index, f"{kind} of {index}")


def test_a_shard_outside_the_checkpoint_is_refused_by_name_but_a_linked_cache_snapshot_is_read(inputs, tmp_path):
    d = inputs["sharded"]
    index = d["experts"]["math"] / "model.safetensors.index.json"
    with restored(index):
        content = json.loads(index.read_text())
        name = sorted(content["weight_map"])[0]
        content["weight_map"][name] = "../../../other/model.safetensors"
        index.write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=r"names shard '../../../other/model.safetensors' \(tensor "
                                                  r".*\), which is not a file inside the checkpoint"):
            Checkpoint(index.parent)
    # the Hugging Face cache: every file of a snapshot links to ../../blobs/<hash>
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "abc", tmp_path / "hub" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(d["instruct"].iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    linked = Checkpoint(snapshot)
    assert linked.names == Checkpoint(d["instruct"]).names


CONFIG_VALUES = {
    "model_type": [None, 1, [], "", "mamba", "../../../tmp/x", "llama\n", "LLAMA", {"a": 1}],
    "num_hidden_layers": ["x", [4], None, -1, True, 4.5, 3, 2 ** 70, {}],
    "vocab_size": [None, "48", 47, [], -5, 1e3, False],
    "tie_word_embeddings": ["yes", 1, None, [], True, {}],
    "text_config": ["x", [], {"vocab_size": "x"}, {"num_hidden_layers": None}, None],
}
CONFIG_DAMAGE = ["truncate", "flip", "whole", "value", "value", "drop", "special", "bytes"]


def damaged_json(file: Path, rng: random.Random, kind: str, values: dict, wholes: list = ()) -> tuple:
    """(the damaged bytes, the parsed original) of a JSON file for one kind of damage: truncated,
    bytes flipped, replaced whole by another JSON value, or one key given a value of ``values``;
    other kinds leave the bytes as they are, for the caller."""
    data = bytearray(file.read_bytes())
    config = json.loads(data)
    if kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "flip":
        flip(data, rng, 0, len(data), rng.randint(1, 3))
    elif kind == "whole":
        data = bytearray(json.dumps(rng.choice([[config], 1, "config", None, *wholes])).encode())
    elif kind == "value":
        key = rng.choice(sorted(values))
        config[key] = rng.choice(values[key])
        data = bytearray(json.dumps(config).encode())
    return data, config


@pytest.mark.parametrize("seed", range(40))
def test_a_damaged_config(inputs, seed):
    rng = random.Random(2000 + seed)
    d = inputs["family"]
    file = roles(d)[rng.choice(["base", "instruct", "math"])] / "config.json"
    kind = CONFIG_DAMAGE[seed % len(CONFIG_DAMAGE)]
    with restored(file):
        data, config = damaged_json(file, rng, kind, CONFIG_VALUES, [True, [1, 2]])
        if kind == "drop":
            config.pop(rng.choice(["model_type", "num_hidden_layers", "vocab_size", "tie_word_embeddings"]))
            data = bytearray(json.dumps(config).encode())
        elif kind == "bytes":
            data = bytearray(rng.choice([b"\xff\xfe\xfd", b"[" * 100_000, b'{"a": 1' + b"0" * 5000 + b"}", b""]))
        if kind == "special":
            make_special(file, SPECIAL[rng.randrange(len(SPECIAL))])
        else:
            file.write_bytes(bytes(data))
        check(lambda: open_family(d), file, f"{kind} of {file}")


ADAPTER_VALUES = {
    "peft_type": [None, 1, "IA3", "lora", [], "LORA\n"],
    "r": [0, -4, "4", 4.0, None, True, [], 3, 2 ** 70],
    "lora_alpha": ["8", None, float("nan"), float("inf"), True, [], 0, -8],
    "rank_pattern": [[], "x", {"(": 2}, {"down_proj": 0}, {"down_proj": "2"}, {"down_proj": 3}, None, {}],
    "alpha_pattern": [[], {"[": 1}, {"v_proj": None}, {"v_proj": float("inf")}, {"v_proj": True}, None],
    "use_rslora": ["yes", 1, None, True, []],
    "fan_in_fan_out": ["no", 0, None, True],
    "use_dora": ["false", None, True, 1],
    "lora_bias": [None, "x", True],
    "base_model_name_or_path": [5, None, [], "", "someone/else"],
}
ADAPTER_DAMAGE = ["truncate", "flip", "whole", "value", "value", "value", "special", "weights"]


@pytest.mark.parametrize("seed", range(40))
def test_a_damaged_adapter(inputs, seed):
    rng = random.Random(3000 + seed)
    d, adapter = inputs["family"], inputs["adapter"]
    kind = ADAPTER_DAMAGE[seed % len(ADAPTER_DAMAGE)]
    if kind == "weights":
        file = adapter / "adapter_model.safetensors"
        with restored(file):
            what = damage_safetensors(file, rng, rng.choice(SAFETENSORS_DAMAGE))
            check(lambda: open_family(d, adapter), file, what)
        return
    file = adapter / "adapter_config.json"
    with restored(file):
        data, _ = damaged_json(file, rng, kind, ADAPTER_VALUES)
        if kind == "special":
            make_special(file, SPECIAL[rng.randrange(len(SPECIAL))])
        else:
            file.write_bytes(bytes(data))
        check(lambda: open_family(d, adapter), file, f"{kind} of {file}")


@pytest.mark.parametrize("config, factor_rank, message", [
    ({"r": 0}, 4, r"adapter_config.json \(expert 'math'\): r is 0, not a positive integer"),
    ({"r": 0}, 0, r"r is 0, not a positive integer"),
    ({"r": 3}, 4, r"module '.*': its LoRA factors have rank 4, but adapter_config.json gives it r=3 .*PEFT "
                  r"would refuse to load this adapter"),
    ({"rank_pattern": {"down_proj": 4}}, 4, r"module '.*down_proj': its LoRA factors have rank 2, but .* r=4"),
])
def test_a_rank_the_config_does_not_give_is_refused_as_peft_would(inputs, tmp_path, config, factor_rank, message):
    d = inputs["family"]
    adapter = tmp_path / "lora"
    shutil.copytree(inputs["adapter"], adapter)
    if factor_rank != 4:
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        tensors = {k: v[:factor_rank] if "lora_A" in k or "embedding_A" in k else v[:, :factor_rank]
                   for k, v in tensors.items()}
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    edited = {**json.loads((adapter / "adapter_config.json").read_text()), **config}
    (adapter / "adapter_config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=message):
        Family.open(d["base"], d["instruct"], {"math": adapter})


RECIPE_VALUES = {
    "models": [None, "x", {"a": 1}, [1], ["org/math"], [None]],
    "model": [5, None, [], {"a": 1}],
    "parameters": [[], "x", 1],
    "weight": ["x", [], {}, [{"filter": 3, "value": 1}], True, float("inf"), [float("nan"), 1.0], 10 ** 400,
               [1, "a"], [{"filter": "mlp", "value": 1}], {"value": {"value": {"value": 1}}}, -2, [[1, 2]]],
}
RECIPE_DAMAGE = ["truncate", "flip", "value", "value", "value", "text", "special", "whole"]
RECIPE_TEXTS = [b"models: [", b"a: b: c", b"\xff\xfe\x00", b"- 2020-99-99", b"models:\n  - &a {value: *a}\n",
                b"a: &a [*a, *a]\nb: &b [*a, *a]\nmodels: [{model: x, parameters: {weight: &c [*b, *b]}}]",
                b"models: [{model: x, parameters: {weight: &w {value: *w}}}]",
                b"models: [{model: x, parameters: {weight: " + b"9" * 5000 + b"}}]",
                b"models: [{model: x, parameters: {weight: !!binary AAA}}]", b"? [a, b]\n: c", b"{[1]: 2}",
                b"models: [{model: x, parameters: {weight: !!python/object:os.system x}}]", b"\t", b""]


@pytest.mark.parametrize("seed", range(32))
def test_a_damaged_mergekit_recipe(inputs, seed):
    rng = random.Random(4000 + seed)
    file = inputs["recipe"]
    kind = RECIPE_DAMAGE[seed % len(RECIPE_DAMAGE)]
    with restored(file):
        data = bytearray(file.read_bytes())
        recipe = json.loads(json.dumps(RECIPE))
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        elif kind == "flip":
            flip(data, rng, 0, len(data), rng.randint(1, 3))
        elif kind == "value":
            key = rng.choice(sorted(RECIPE_VALUES))
            value = rng.choice(RECIPE_VALUES[key])
            if key == "models":
                recipe["models"] = value
            elif key == "weight":
                recipe["models"][0]["parameters"]["weight"] = value
            else:
                recipe["models"][0][key] = value
            data = bytearray(yaml.safe_dump(recipe).encode())
        elif kind == "text":
            data = bytearray(rng.choice(RECIPE_TEXTS))
        elif kind == "whole":
            data = bytearray(yaml.safe_dump(rng.choice([[RECIPE], 1, "recipe", None])).encode())
        if kind == "special":
            make_special(file, SPECIAL[rng.randrange(len(SPECIAL))])
        else:
            file.write_bytes(bytes(data))
        model = rng.choice([None, "org/math", "math"])
        check(lambda: recipe_weights(file, 4, model), file, f"{kind} of {file}")


def test_every_recipe_text_is_refused_by_name(tmp_path):
    file = tmp_path / "recipe.yaml"
    for text in RECIPE_TEXTS:
        file.write_bytes(text)
        with pytest.raises(ConfigError) as caught:
            recipe_weights(file, 4)
        message = str(caught.value)
        assert str(file) in message and message.splitlines() == [message], (text, message)


# ---------------------------------------------------------------------------------- the command line


def run_cli(d: dict, tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "LATA_CACHE": str(tmp_path / "cache"), "LATA_RESULTS": str(tmp_path / "results")}
    return subprocess.run([*LATA, *family_args(d), "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, tmp_path: Path, names: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("lata: error:") and names in lines[0], result.stderr[-3000:]
    results = tmp_path / "results"
    assert not results.exists() or not any(p.is_file() for p in results.rglob("*"))  # nothing written


def family_copy(inputs, tmp_path: Path, which: str = "family") -> dict:
    source = inputs[which]
    copy = {role: tmp_path / which / role for role in ("base", "instruct")}
    for role in ("base", "instruct"):
        shutil.copytree(source[role], copy[role])
    shutil.copytree(source["experts"]["math"], tmp_path / which / "math")
    return {**copy, "experts": {"math": tmp_path / which / "math"}}


@pytest.mark.timeout(90)
def test_the_cli_refuses_a_header_length_of_2_to_the_64(inputs, tmp_path):
    d = family_copy(inputs, tmp_path)
    file = d["experts"]["math"] / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8
    file.write_bytes(bytes(data))
    assert_one_line_error(run_cli(d, tmp_path), tmp_path, str(file))


@pytest.mark.timeout(90)
def test_the_cli_refuses_a_config_that_is_a_list(inputs, tmp_path):
    d = family_copy(inputs, tmp_path)
    (d["instruct"] / "config.json").write_text("[1, 2]")
    assert_one_line_error(run_cli(d, tmp_path), tmp_path, str(d["instruct"] / "config.json"))


@pytest.mark.timeout(90)
def test_the_cli_refuses_a_config_without_model_type(inputs, tmp_path):
    d = family_copy(inputs, tmp_path)
    file = d["base"] / "config.json"
    config = json.loads(file.read_text())
    del config["model_type"]
    file.write_text(json.dumps(config))
    result = run_cli(d, tmp_path)
    assert_one_line_error(result, tmp_path, f"{file} (base) has no model_type")


@pytest.mark.timeout(90)
def test_the_cli_refuses_an_adapter_of_rank_0(inputs, tmp_path):
    d = family_copy(inputs, tmp_path)
    adapter = tmp_path / "lora"
    shutil.copytree(inputs["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 0
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli({**d, "experts": {"math": adapter}}, tmp_path)
    assert_one_line_error(result, tmp_path, f"{adapter / 'adapter_config.json'} (expert 'math'): r is 0")


@pytest.mark.timeout(90)
def test_the_cli_refuses_an_index_entry_outside_the_checkpoint(inputs, tmp_path):
    d = family_copy(inputs, tmp_path, "sharded")
    index = d["experts"]["math"] / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    name = sorted(content["weight_map"])[0]
    shard = content["weight_map"][name]
    content["weight_map"][name] = f"../../other/{shard}"
    index.write_text(json.dumps(content))
    (tmp_path / "other").mkdir()
    shutil.copy(d["experts"]["math"] / shard, tmp_path / "other" / shard)  # the file is there: still refused
    assert_one_line_error(run_cli(d, tmp_path), tmp_path, str(index))


@pytest.mark.timeout(90)
def test_the_cli_refuses_a_fifo_model_file(inputs, tmp_path):
    d = family_copy(inputs, tmp_path)
    file = d["experts"]["math"] / "model.safetensors"
    file.unlink()
    os.mkfifo(file)
    assert_one_line_error(run_cli(d, tmp_path, timeout=20), tmp_path, str(file))
