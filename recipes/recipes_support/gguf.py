"""Load a GGUF checkpoint as a plain, trainable transformers model, and cache it.

``from_pretrained(folder, gguf_file=...)`` de-quantizes the GGUF tensors into a regular model but keeps a
GGUF ``quantization_config`` (and ``hf_quantizer``) on it, and ``Trainer`` refuses to fine-tune quantized
models. So the model is rebuilt from its config without that entry and the de-quantized weights are
copied in. The result is saved with ``save_pretrained`` once: reloading it takes under a second instead
of ~15 s of de-quantization.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .assets import MissingAssetError, cache_root

__all__ = ["plain_copy", "load_gguf_causal_lm", "gguf_cache_dir", "align_eos_with_generation_config"]

logger = logging.getLogger(__name__)


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture and weights as ``model``, without any quantization config."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"rebuilding the GGUF model left weights unset {missing} or unused {unexpected}.")
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain


def align_eos_with_generation_config(model: torch.nn.Module, tokenizer) -> None:
    """Make ``tokenizer.eos_token`` the token the GGUF metadata names as end of sequence.

    transformers before 5.23 converts SmolLM2's GGUF tokenizer with ``eos_token = "<|im_start|>"`` while
    the GGUF header (and so ``model.generation_config``) says ``<|im_end|>``; generation then runs past
    every answer until ``max_new_tokens``. The model's own ids are the ones it was trained to emit.
    """
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if not isinstance(eos, int) or tokenizer.eos_token_id == eos:
        return
    token = tokenizer.convert_ids_to_tokens(eos)
    logger.warning(
        "the GGUF tokenizer's eos_token %r is not the model's end of sequence %r (id %d): using %r",
        tokenizer.eos_token,
        token,
        eos,
        token,
    )
    tokenizer.eos_token = token


def gguf_cache_dir(gguf_path: Path, cache_dir: str | None = None) -> Path:
    """Cache folder of one GGUF file (its name and size identify it)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    return root / f"{gguf_path.stem}-{gguf_path.stat().st_size}"


def load_gguf_causal_lm(gguf_path: str | Path, cache_dir: str | None = None):
    """(model, tokenizer) of a causal-LM GGUF file, from the ``save_pretrained`` cache when present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    cached = gguf_cache_dir(gguf_path, cache_dir)
    if (cached / "config.json").is_file():
        logger.info("loading the rebuilt GGUF model from %s", cached)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
        align_eos_with_generation_config(model, tokenizer)  # caches written by older transformers
        return model, tokenizer
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(
            f"reading {gguf_path.name} needs the gguf package, which is not installed.\n"
            "Install it with:\n    pip install gguf\n(or run `bash recipes/setup.sh`)."
        )
    logger.info("de-quantizing %s (once; cached in %s)", gguf_path, cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = plain_copy(quantized)
    del quantized
    align_eos_with_generation_config(model, tokenizer)
    # write to a temporary sibling and rename: a concurrent run never sees a half-written cache
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like HF_HOME
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, cached)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (cached / "config.json").is_file():
            raise
    return model, tokenizer
