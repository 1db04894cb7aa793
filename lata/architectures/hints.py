"""What transformers itself says about a model_type, read without loading any weights.

Two facts, each None where transformers does not know the type (or cannot say):

- the default of ``tie_word_embeddings``: the attribute of ``AutoConfig.for_model(model_type)``,
  the config class built with its own defaults;
- the tied pairs its causal-LM class declares (``_tied_weights_keys``: {alias: canonical} in
  transformers 5, a list of aliases before), for the class ``AutoModelForCausalLM`` (else
  ``AutoModelForImageTextToText``) maps the type to. transformers names a parameter as its
  modules nest, which a checkpoint's tensor names need not follow (multimodal checkpoints are
  written under their older names): callers use a declared pair only where its canonical
  tensor is in the checkpoint.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache


@contextlib.contextmanager
def _quiet():
    """transformers' logger at errors only (a config built with defaults may warn about them)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@lru_cache(maxsize=None)
def tie_default(model_type: str) -> bool | None:
    """transformers' default ``tie_word_embeddings`` for ``model_type``, or None."""
    try:
        from transformers import AutoConfig

        with _quiet():
            config = AutoConfig.for_model(model_type)
    except Exception:  # an unknown type (ValueError), or a config class that needs arguments
        return None
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None and hasattr(config, "get_text_config"):
        tied = getattr(config.get_text_config(), "tie_word_embeddings", None)
    return tied if isinstance(tied, bool) else None


@lru_cache(maxsize=None)
def declared_ties(model_type: str) -> tuple[tuple[str, str | None], ...]:
    """(alias, canonical or None) pairs the causal-LM class of ``model_type`` declares tied."""
    try:
        import transformers
        from transformers.models.auto import modeling_auto

        mappings = (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
        name = next((m[model_type] for m in mappings if isinstance(m.get(model_type), str)), None)
        if name is None:
            return ()
        with _quiet():
            declared = getattr(getattr(transformers, name), "_tied_weights_keys", None)
    except Exception:  # a class whose module cannot be imported here (an optional dependency)
        return ()
    if isinstance(declared, dict):
        return tuple((str(a), str(c)) for a, c in declared.items())
    if isinstance(declared, (list, tuple)):
        return tuple((str(a), None) for a in declared)
    return ()
