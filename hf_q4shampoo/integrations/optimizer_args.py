"""``TrainingArguments`` -> ``(optimizer class, kwargs)`` for ``optim="q4shampoo"``, ``"q4adamw"``, ``"sparse_mfac"``.

Names the ``optim`` values, translates the usual ``TrainingArguments`` fields and the typed ``--optim_args`` of
each optimizer into its keyword arguments (validated before the model is touched), refuses the distributed setups
that hand the optimizer flattened parameters, and makes the stock ``Trainer`` save a DDP-split Q4Shampoo's whole
state. Registration with transformers (the ``OptimizerNames`` members, the handlers, the wrappers) is
:mod:`hf_q4shampoo.integrations.registration`'s.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from ..config import ConfigError, Q4ShampooConfig, parse_optim_args
from ..optimizer import Q4Shampoo
from ..q4adamw import Q4AdamW, Q4AdamWConfig, parse_q4adamw_optim_args
from ..sparse_mfac import SparseMFAC, SparseMFACConfig, parse_sparse_mfac_optim_args

__all__ = [
    "OPTIM_NAME",
    "RESERVED_OPTIM_ARGS",
    "Q4ADAMW_OPTIM_NAME",
    "is_q4adamw_optim",
    "make_q4adamw_cls_and_kwargs",
    "SPARSE_MFAC_OPTIM_NAME",
    "SPARSE_MFAC_RESERVED_OPTIM_ARGS",
    "is_sparse_mfac_optim",
    "make_sparse_mfac_cls_and_kwargs",
    "UnsupportedSetupError",
    "check_optim_args",
    "check_supported_setup",
    "consolidate_for_save",
    "is_q4shampoo_optim",
    "make_optimizer_cls_and_kwargs",
    "saves_consolidated",
]

#: The ``optim`` value that selects Q4Shampoo (``--optim q4shampoo``).
OPTIM_NAME = "q4shampoo"

#: Q4Shampoo options that come from the usual TrainingArguments fields, not from ``--optim_args``.
RESERVED_OPTIM_ARGS = {
    "lr": "--learning_rate",
    "betas": "--adam_beta1 / --adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay (applied per parameter group by the Trainer)",
}

#: The ``optim`` value that selects SparseMFAC (``--optim sparse_mfac``).
SPARSE_MFAC_OPTIM_NAME = "sparse_mfac"

#: SparseMFAC options that come from the usual TrainingArguments fields, not from ``--optim_args``.
SPARSE_MFAC_RESERVED_OPTIM_ARGS = {
    "lr": "--learning_rate",
    "weight_decay": "--weight_decay (applied per parameter group by the Trainer)",
}

#: The ``optim`` value that selects Q4AdamW (``--optim q4adamw``); its reserved keys are Q4Shampoo's.
Q4ADAMW_OPTIM_NAME = "q4adamw"

_SUPPORTED = (
    "Supported setups: single device, DDP, FSDP2 (fsdp_config {'version': 2}, accelerate fsdp_version: 2) "
    "and DeepSpeed ZeRO stage 0."
)


class UnsupportedSetupError(RuntimeError):
    """The training setup hands the optimizer flattened parameters (DeepSpeed ZeRO >= 1, FSDP1)."""


# --------------------------------------------------------------------------------------------
# name handling
# --------------------------------------------------------------------------------------------


def _selects(optim: Any, name: str) -> bool:
    """Whether an ``optim`` value (plain string or ``OptimizerNames`` member) is ``name``, in any case."""
    value = getattr(optim, "value", optim)
    return isinstance(value, str) and value.lower() == name


def is_q4shampoo_optim(optim: Any) -> bool:
    """Whether an ``optim`` value (plain string or ``OptimizerNames`` member) selects Q4Shampoo."""
    return _selects(optim, OPTIM_NAME)


def is_q4adamw_optim(optim: Any) -> bool:
    """Whether an ``optim`` value selects Q4AdamW."""
    return _selects(optim, Q4ADAMW_OPTIM_NAME)


def is_sparse_mfac_optim(optim: Any) -> bool:
    """Whether an ``optim`` value selects SparseMFAC."""
    return _selects(optim, SPARSE_MFAC_OPTIM_NAME)


# --------------------------------------------------------------------------------------------
# TrainingArguments -> (Q4Shampoo, kwargs)
# --------------------------------------------------------------------------------------------


def make_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type[Q4Shampoo], dict[str, Any]]:
    """``(Q4Shampoo, kwargs)`` for a ``TrainingArguments`` (or ``SFTConfig``) instance.

    The no-magic path: ``Trainer(..., optimizer_cls_and_kwargs=make_optimizer_cls_and_kwargs(args))``
    works with stock ``TrainingArguments`` whatever ``args.optim`` says (the model card will then show
    that ``optim`` name). ``lr``, ``betas``, ``eps`` and the default ``weight_decay`` come from
    ``learning_rate``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon`` and ``weight_decay``; the
    Trainer's decay / no-decay parameter groups carry their own ``weight_decay``, which takes
    precedence. Every other option comes from ``args.optim_args`` (``"update_freq=10,root_freq=50"``),
    typed and validated. ``total_steps`` (which the ``"auto"`` schedule reads) is ``max_steps`` when that
    is set; :class:`~hf_q4shampoo.Q4ShampooTrainer` also fills it for runs given in epochs.

    Raises:
        ConfigError: an unknown ``optim_args`` key, a bad value, or a reserved key (the message names
            the key and the allowed keys / values).
        UnsupportedSetupError: DeepSpeed ZeRO >= 1 or FSDP1 (see :func:`check_supported_setup`).
    """
    del model  # Q4Shampoo needs no model: the Trainer's parameter groups carry everything
    check_supported_setup(args)
    kwargs = _q4shampoo_kwargs(args)
    if getattr(args, "world_size", 1) > 1:
        _consolidate_before_save()
    return Q4Shampoo, kwargs


#: attribute of the wrapped ``Trainer._save_optimizer_and_scheduler``
_SAVE_MARK = "_q4shampoo_consolidates"


def consolidate_for_save(trainer: Any) -> None:
    """Gather a DDP-split Q4Shampoo's shares into the ranks that write ``optimizer.pt`` (a collective: every
    rank must call it; ``Trainer._save_optimizer_and_scheduler`` is reached by every rank). Else nothing."""
    from ..memory import unwrap_optimizer

    optimizer = unwrap_optimizer(getattr(trainer, "optimizer", None))
    if isinstance(optimizer, Q4Shampoo) and optimizer.distributed_info() is not None:
        optimizer.consolidate_state_dict(to=None if trainer.args.save_on_each_node else 0)


def saves_consolidated() -> bool:
    """Whether the stock ``Trainer`` already gathers Q4Shampoo's shares before saving (see below)."""
    import sys

    trainer = sys.modules.get("transformers.trainer")
    method = getattr(getattr(trainer, "Trainer", None), "_save_optimizer_and_scheduler", None)
    return bool(getattr(method, _SAVE_MARK, False))


def _consolidate_before_save() -> None:
    """Wrap ``Trainer._save_optimizer_and_scheduler`` once, so that under DDP the stock Trainer writes Q4Shampoo's
    whole state into ``optimizer.pt``, not rank 0's share (``shard_preconditioners``; the Trainer saves the
    optimizer state of the saving rank only). Done when a multi-process run builds the optimizer, when
    ``transformers.trainer`` is loaded anyway; additive: other optimizers pass straight through."""
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler
    if getattr(original, _SAVE_MARK, False):
        return

    @functools.wraps(original)
    def save(self: Any, output_dir: str) -> None:
        consolidate_for_save(self)
        original(self, output_dir)

    setattr(save, _SAVE_MARK, True)
    Trainer._save_optimizer_and_scheduler = save


def _adam_kwargs(args: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The Adam-style fields every Adam-based optimizer here takes from ``args``, then the parsed ``optim_args``."""
    return {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        **options,
    }


def _validated(kwargs: dict[str, Any], config_cls: Any, optim_name: str) -> dict[str, Any]:
    """``kwargs`` after building ``config_cls`` from them, so a bad learning rate or beta stops before the model is
    touched; the error names the ``--optim`` it came from."""
    try:
        config_cls.from_kwargs(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err} (from the TrainingArguments of --optim {optim_name})") from err
    return kwargs


def _q4shampoo_kwargs(args: Any) -> dict[str, Any]:
    """Q4Shampoo's keyword arguments from ``args`` (parsed ``optim_args`` + the usual fields), validated."""
    kwargs = _adam_kwargs(args, parse_optim_args(getattr(args, "optim_args", None), reserved=RESERVED_OPTIM_ARGS))
    max_steps = getattr(args, "max_steps", -1)
    if "total_steps" not in kwargs and isinstance(max_steps, int) and max_steps > 0:
        kwargs["total_steps"] = max_steps  # the "auto" schedule follows the run's length
    return _validated(kwargs, Q4ShampooConfig, OPTIM_NAME)


# --------------------------------------------------------------------------------------------
# TrainingArguments -> (Q4AdamW, kwargs)
# --------------------------------------------------------------------------------------------


def make_q4adamw_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type[Q4AdamW], dict[str, Any]]:
    """``(Q4AdamW, kwargs)`` for a ``TrainingArguments`` instance (``--optim q4adamw``).

    ``lr``, ``betas``, ``eps`` and the default ``weight_decay`` come from ``learning_rate``,
    ``adam_beta1``/``adam_beta2``, ``adam_epsilon`` and ``weight_decay`` (the Trainer's decay / no-decay
    groups carry their own); the storage options from ``args.optim_args`` (``"variant=factor"``), typed and
    validated. Works under the setups AdamW works under: an elementwise step needs no matrix shapes (a
    flattened parameter's v falls back from rank-1 to blocks of 128).

    Raises:
        ConfigError: an unknown ``optim_args`` key, a bad value, or a reserved key (the message names
            the key and the allowed keys / values).
    """
    del model  # the Trainer's parameter groups carry everything
    return Q4AdamW, _q4adamw_kwargs(args)


def _q4adamw_kwargs(args: Any) -> dict[str, Any]:
    """Q4AdamW's keyword arguments from ``args`` (parsed ``optim_args`` + the usual fields), validated."""
    options = parse_q4adamw_optim_args(getattr(args, "optim_args", None), reserved=RESERVED_OPTIM_ARGS)
    return _validated(_adam_kwargs(args, options), Q4AdamWConfig, Q4ADAMW_OPTIM_NAME)


# --------------------------------------------------------------------------------------------
# TrainingArguments -> (SparseMFAC, kwargs)
# --------------------------------------------------------------------------------------------


def make_sparse_mfac_cls_and_kwargs(args: Any, model: Any = None) -> tuple[type[SparseMFAC], dict[str, Any]]:
    """``(SparseMFAC, kwargs)`` for a ``TrainingArguments`` instance (``--optim sparse_mfac``).

    ``lr`` comes from ``learning_rate`` and the default ``weight_decay`` from ``weight_decay`` (the
    Trainer's decay / no-decay groups carry their own); every other option from ``args.optim_args``
    (``"m=32,k_fraction=0.01,damp=1e-6"``), typed and validated. ``--weight_decay`` is AdamW's decoupled,
    lr-scaled decay in transformers, so here ``lr_scaled_decay`` defaults to true (``p <- (1 - lr wd) p``);
    ``optim_args`` ``lr_scaled_decay=false`` gives EFCP's unscaled ``p <- (1 - wd) p``.

    Raises:
        ConfigError: an unknown ``optim_args`` key, a bad value, or a reserved key (the message names
            the key and the allowed keys / values).
        UnsupportedSetupError: DeepSpeed ZeRO >= 1 or FSDP (only single device and DDP are supported).
    """
    del model  # the Trainer's parameter groups carry everything
    problem = _deepspeed_problem(args) or ("FSDP" if _fsdp_version(args) is not None else None)
    if problem is not None:
        raise UnsupportedSetupError(
            f"--optim {SPARSE_MFAC_OPTIM_NAME} cannot run with {problem}: it preconditions each parameter group "
            "as one flattened vector held whole on every rank. Supported setups: single device and DDP."
        )
    return SparseMFAC, _sparse_mfac_kwargs(args)


def _sparse_mfac_kwargs(args: Any) -> dict[str, Any]:
    """SparseMFAC's keyword arguments from ``args`` (parsed ``optim_args`` + the usual fields), validated."""
    options = parse_sparse_mfac_optim_args(getattr(args, "optim_args", None), reserved=SPARSE_MFAC_RESERVED_OPTIM_ARGS)
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scaled_decay": True,
        **options,
    }
    return _validated(kwargs, SparseMFACConfig, SPARSE_MFAC_OPTIM_NAME)


def check_optim_args(args: Any) -> None:
    """Parse and validate ``args.optim_args`` now if ``args.optim`` selects Q4Shampoo, Q4AdamW or SparseMFAC.

    Raises :class:`~hf_q4shampoo.config.ConfigError` (one line naming the key and the allowed keys or
    values). Registration runs it when ``TrainingArguments`` are built, and
    :class:`~hf_q4shampoo.Q4ShampooTrainingArguments` does too, so mistakes stop argument parsing.
    """
    optim = getattr(args, "optim", None)
    if is_q4shampoo_optim(optim):
        _q4shampoo_kwargs(args)
    elif is_q4adamw_optim(optim):
        _q4adamw_kwargs(args)
    elif is_sparse_mfac_optim(optim):
        _sparse_mfac_kwargs(args)


# --------------------------------------------------------------------------------------------
# unsupported distributed setups
# --------------------------------------------------------------------------------------------


def _truthy(text: str | None) -> bool:
    return str(text).strip().lower() in {"1", "true", "yes", "y", "on"}


def _deepspeed_config(args: Any) -> dict[str, Any] | None:
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if isinstance(getattr(hf_config, "config", None), dict):
        return hf_config.config
    source = getattr(args, "deepspeed", None)
    if isinstance(source, dict):
        return source
    if isinstance(source, str) and source:
        try:
            with open(source, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # DeepSpeed is on, but we cannot read its stage: let the plugin or DeepSpeed say
    return None


def _deepspeed_problem(args: Any) -> str | None:
    """A description of the DeepSpeed setup if it flattens parameters, else None."""
    config = _deepspeed_config(args)
    stage: Any = None
    if config is not None:
        stage = config.get("zero_optimization", {}).get("stage", 0)
    elif getattr(args, "deepspeed_plugin", None) is not None:
        stage = getattr(args.deepspeed_plugin, "zero_stage", None)
    elif _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")):  # accelerate launch --use_deepspeed
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")  # accelerate's default stage
    if stage is None:
        return None
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        return f"DeepSpeed with zero_optimization.stage={stage!r}"
    if stage >= 1:
        return f"DeepSpeed ZeRO stage {stage} (it hands the optimizer flat 1-D partitions)"
    if (
        config
        and config.get("bf16", {}).get("enabled")
        and config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    ):
        return "DeepSpeed bf16 with grad_accum_dtype fp32 (its BF16_Optimizer flattens the parameters)"
    return None


def _fsdp_version(args: Any) -> int | None:
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if isinstance(plugin_args, dict) and "fsdp_version" in plugin_args:
        return int(plugin_args["fsdp_version"])
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", 1))
    if _truthy(os.environ.get("ACCELERATE_USE_FSDP")):  # accelerate launch --use_fsdp
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default version
    return None


def check_supported_setup(args: Any) -> None:
    """Raise :class:`UnsupportedSetupError` if ``args`` select DeepSpeed ZeRO >= 1 or FSDP1.

    Both hand the optimizer flattened 1-D views of the parameters, so the matrix shapes Shampoo needs are
    lost. Called when the optimizer is chosen (before the first step); the optimizer itself also refuses
    flattened parameters it receives.
    """
    problem = _deepspeed_problem(args)
    if problem is None and _fsdp_version(args) == 1:
        problem = "FSDP1 (fsdp_config version 1: FlatParameter / flattened use_orig_params views)"
    if problem is not None:
        raise UnsupportedSetupError(
            f"--optim {OPTIM_NAME} cannot run with {problem}: Shampoo needs each parameter's matrix shape. {_SUPPORTED}"
        )
