"""``q4shampoo memory MODEL``: the pre-flight estimate of optimizer-state memory (:func:`estimate_memory`) as a table.

Arguments are parsed before torch and transformers are imported, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="q4shampoo memory",
        description="Estimate optimizer-state memory for a model before training (nothing is allocated: "
        "the model is built on the meta device from its config).",
    )
    p.add_argument(
        "model",
        metavar="MODEL_NAME_OR_PATH",
        help="folder holding config.json, a config.json path, or a Hub name (needs the Hub)",
    )
    p.add_argument(
        "--optim_args",
        default=None,
        help="Q4Shampoo options as key=value,... (Q4ShampooConfig fields), e.g. precond=eigen,max_precond_dim=2048",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="dtype of the trainable parameters (default float32; with --lora_r, of the model and its adapters)",
    )
    p.add_argument(
        "--model_class",
        default=None,
        help="transformers class to build (default: the config's architectures, else AutoModelForCausalLM)",
    )
    p.add_argument(
        "--lora_r",
        type=int,
        default=None,
        help="estimate for a peft LoRA adapter of this rank (only the adapter is trainable)",
    )
    p.add_argument(
        "--lora_target_modules",
        default="all-linear",
        help="comma-separated module names for --lora_r (default all-linear)",
    )
    p.add_argument(
        "--torchao_block_size",
        type=int,
        default=256,
        help="block size of the torchao 4-bit row (default 256, as HF Trainer)",
    )
    p.add_argument(
        "--bnb_quantize_embeddings",
        action="store_true",
        help="8-bit row: quantize embeddings too (plain bitsandbytes; HF Trainer keeps them 32-bit)",
    )
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def _with_lora(model: Any, r: int, target_modules: str) -> Any:
    """``model`` with LoRA adapters of rank ``r``, in the model's dtype (as ``--dtype`` asks: peft's own default
    would keep the adapters in float32)."""
    try:
        import peft
    except ImportError as e:  # peft is an extra: pip install "hf-q4shampoo[peft]"
        raise SystemExit("q4shampoo memory: --lora_r needs the peft package (pip install peft)") from e
    targets: str | list[str] = target_modules if target_modules == "all-linear" else target_modules.split(",")
    return peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=targets), autocast_adapter_dtype=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``q4shampoo memory``: print the estimate table; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .config import ConfigError, parse_optim_args  # after parsing: --help and usage errors need no torch
    from .estimate import build_meta_model, estimate_memory

    try:
        options = parse_optim_args(args.optim_args)
        target: Any = args.model
        if args.lora_r is not None:
            target, _ = build_meta_model(args.model, model_class=args.model_class, dtype=args.dtype)
            target = _with_lora(target, args.lora_r, args.lora_target_modules)
        estimate = estimate_memory(
            target,
            dtype=None if args.lora_r is not None else args.dtype,
            model_class=None if args.lora_r is not None else args.model_class,
            bnb_embeddings_32bit=not args.bnb_quantize_embeddings,
            torchao_block_size=args.torchao_block_size,
            **options,
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"q4shampoo memory: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return 0
    print(
        f"{estimate.model}: {estimate.num_params / 1e6:,.1f}M parameters, "
        f"{estimate.num_trainable / 1e6:,.1f}M trainable ({estimate.param_dtype})"
    )
    opts = ", ".join(f"{k}={v}" for k, v in estimate.options.items()) or "defaults"
    print(f"Q4Shampoo options: {opts}. Optimizer state once every parameter has stepped:\n")
    print(estimate.to_markdown())
    print("\nHow each row is computed (n: entries of a trainable tensor, s: bytes per entry of its dtype):")
    print(estimate.how_text())
    for note in estimate.notes:
        print(f"Note: {note}")
    print(f"\n(estimated in {estimate.seconds:.1f} s on the meta device; nothing was allocated)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
