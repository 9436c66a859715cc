"""Make ``optim="q4shampoo"``, ``optim="q4adamw"`` and ``optim="sparse_mfac"`` known to stock transformers.

The light part of the integration.

``import hf_q4shampoo`` calls :func:`register`, so this module imports only what registration needs
(``transformers.training_args`` and, from 5.2 on, ``transformers.trainer_optimizer``; not ``Trainer``
itself except on 5.0/5.1, where the dispatch lives in it).

What :func:`register` does, and why it works across transformers 5.x
--------------------------------------------------------------------
Transformers validates ``optim`` in three places (docs: transformers-integration.md §1.2), and
registration touches exactly the two objects those checks consult (plus one check of our own, 3.):

1. ``OptimizerNames`` (a closed ``str`` Enum; the same in every 5.x) gets one member
   ``Q4SHAMPOO = "q4shampoo"``. ``HfArgumentParser`` computes ``--optim``'s argparse ``choices`` from
   this Enum *when the parser is constructed*, and ``TrainingArguments.__post_init__`` converts with
   ``OptimizerNames(value)``: so registration must run before ``HfArgumentParser(...)`` is built.
2. The dispatch from that name to ``(Q4Shampoo, kwargs)``:

   * transformers >= 5.2 (``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` exists): one entry
     is added to that dict (mode ``"handler_registry"``);
   * transformers 5.0 / 5.1 (no such module; an if/elif chain inside
     ``Trainer.get_optimizer_cls_and_kwargs``): that staticmethod is wrapped once; the wrapper answers
     ``q4shampoo`` and hands every other name to the original (mode ``"trainer_wrapper"``). The
     wrapper is also the fallback if a later release drops the private dict.
3. ``TrainingArguments.__post_init__`` is wrapped once so that arguments selecting ``q4shampoo`` (or
   ``sparse_mfac``) have their ``optim_args`` parsed and validated when the arguments are built
   (:func:`check_optim_args`): a malformed value stops the script at argument parsing with one line naming
   the key and the allowed keys or values, not at ``train()`` after the model and data are loaded (and not
   inside transformers' own untyped parser, which fails on an item without ``=`` with "not enough values
   to unpack"). Arguments selecting any other optimizer are not looked at.

``sparse_mfac`` (:class:`~hf_q4shampoo.sparse_mfac.SparseMFAC`) is registered the same way, as a
second member ``SPARSE_MFAC = "sparse_mfac"`` with its own handler (and the same wrapper on 5.0 / 5.1);
its ``--optim_args`` are parsed by :func:`~hf_q4shampoo.sparse_mfac.parse_sparse_mfac_optim_args`.
``q4adamw`` (:class:`~hf_q4shampoo.q4adamw.Q4AdamW`, paper 3's 4-bit AdamW) likewise, as ``Q4ADAMW =
"q4adamw"``, its ``--optim_args`` parsed by :func:`~hf_q4shampoo.q4adamw.parse_q4adamw_optim_args`.

All three steps are additive (no existing member, handler or behaviour changes) and idempotent. Unknown
names keep transformers' own errors. The handler reads ``--optim_args`` itself with
:func:`~hf_q4shampoo.config.parse_optim_args` (typed, validated, naming the bad key and the allowed
ones) instead of transformers' untyped string dict.

Without registration (``HF_Q4SHAMPOO_AUTO_REGISTER=0`` before the import), the same optimizer is
reachable through ``Q4ShampooTrainer`` / ``Q4ShampooTrainingArguments`` or
``Trainer(optimizer_cls_and_kwargs=make_optimizer_cls_and_kwargs(args))``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from typing import Any, Literal

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
    "is_q4shampoo_optim",
    "is_registered",
    "make_optimizer_cls_and_kwargs",
    "register",
]

logger = logging.getLogger(__name__)

#: The ``optim`` value that selects Q4Shampoo (``--optim q4shampoo``).
OPTIM_NAME = "q4shampoo"
_MEMBER_NAME = "Q4SHAMPOO"

#: Q4Shampoo options that come from the usual TrainingArguments fields, not from ``--optim_args``.
RESERVED_OPTIM_ARGS = {
    "lr": "--learning_rate",
    "betas": "--adam_beta1 / --adam_beta2",
    "eps": "--adam_epsilon",
    "weight_decay": "--weight_decay (applied per parameter group by the Trainer)",
}

#: The ``optim`` value that selects SparseMFAC (``--optim sparse_mfac``).
SPARSE_MFAC_OPTIM_NAME = "sparse_mfac"
_SPARSE_MFAC_MEMBER_NAME = "SPARSE_MFAC"

#: SparseMFAC options that come from the usual TrainingArguments fields, not from ``--optim_args``.
SPARSE_MFAC_RESERVED_OPTIM_ARGS = {
    "lr": "--learning_rate",
    "weight_decay": "--weight_decay (applied per parameter group by the Trainer)",
}

#: The ``optim`` value that selects Q4AdamW (``--optim q4adamw``); its reserved keys are Q4Shampoo's.
Q4ADAMW_OPTIM_NAME = "q4adamw"
_Q4ADAMW_MEMBER_NAME = "Q4ADAMW"

_SUPPORTED = (
    "Supported setups: single device, DDP, FSDP2 (fsdp_config {'version': 2}, accelerate fsdp_version: 2) "
    "and DeepSpeed ZeRO stage 0."
)

RegistrationMode = Literal["handler_registry", "trainer_wrapper"]
_MARK = "_q4shampoo_handler"  # attribute set on our handler / wrapper functions


class UnsupportedSetupError(RuntimeError):
    """The training setup hands the optimizer flattened parameters (DeepSpeed ZeRO >= 1, FSDP1)."""


# --------------------------------------------------------------------------------------------
# name handling
# --------------------------------------------------------------------------------------------


def is_q4shampoo_optim(optim: Any) -> bool:
    """Whether an ``optim`` value (plain string or ``OptimizerNames`` member) selects Q4Shampoo."""
    value = getattr(optim, "value", optim)
    return isinstance(value, str) and value.lower() == OPTIM_NAME


def is_q4adamw_optim(optim: Any) -> bool:
    """Whether an ``optim`` value (plain string or ``OptimizerNames`` member) selects Q4AdamW."""
    value = getattr(optim, "value", optim)
    return isinstance(value, str) and value.lower() == Q4ADAMW_OPTIM_NAME


def is_sparse_mfac_optim(optim: Any) -> bool:
    """Whether an ``optim`` value (plain string or ``OptimizerNames`` member) selects SparseMFAC."""
    value = getattr(optim, "value", optim)
    return isinstance(value, str) and value.lower() == SPARSE_MFAC_OPTIM_NAME


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


def _q4shampoo_kwargs(args: Any) -> dict[str, Any]:
    """Q4Shampoo's keyword arguments from ``args`` (parsed ``optim_args`` + the usual fields), validated."""
    options = parse_optim_args(getattr(args, "optim_args", None), reserved=RESERVED_OPTIM_ARGS)
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        **options,
    }
    max_steps = getattr(args, "max_steps", -1)
    if "total_steps" not in kwargs and isinstance(max_steps, int) and max_steps > 0:
        kwargs["total_steps"] = max_steps  # the "auto" schedule follows the run's length
    try:  # validate now, so a bad learning rate or beta stops before the model is touched
        Q4ShampooConfig.from_kwargs(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err} (from the TrainingArguments of --optim {OPTIM_NAME})") from err
    return kwargs


def _handler(ctx: Any) -> tuple[type[Q4Shampoo], dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS`` entry (transformers >= 5.2). ``ctx`` is an ``OptimizerContext``.

    ``ctx.optim_args`` is transformers' untyped string dict; the original text in ``ctx.args`` is
    parsed again with our typed parser.
    """
    return make_optimizer_cls_and_kwargs(ctx.args, ctx.model)


setattr(_handler, _MARK, True)


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
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        **options,
    }
    try:  # validate now, so a bad learning rate or beta stops before the model is touched
        Q4AdamWConfig.from_kwargs(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err} (from the TrainingArguments of --optim {Q4ADAMW_OPTIM_NAME})") from err
    return kwargs


def _q4adamw_handler(ctx: Any) -> tuple[type[Q4AdamW], dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS`` entry for ``q4adamw`` (transformers >= 5.2)."""
    return make_q4adamw_cls_and_kwargs(ctx.args, ctx.model)


setattr(_q4adamw_handler, _MARK, True)


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
    try:  # validate now, so a bad value stops before the model is touched
        SparseMFACConfig.from_kwargs(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{err} (from the TrainingArguments of --optim {SPARSE_MFAC_OPTIM_NAME})") from err
    return kwargs


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


def _sparse_mfac_handler(ctx: Any) -> tuple[type[SparseMFAC], dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS`` entry for ``sparse_mfac`` (transformers >= 5.2)."""
    return make_sparse_mfac_cls_and_kwargs(ctx.args, ctx.model)


setattr(_sparse_mfac_handler, _MARK, True)


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


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------


def _extend_enum(cls: Any, name: str, value: str) -> Any:
    """Add ``name = value`` to the ``str`` Enum ``cls`` (idempotent); return the member.

    ``Enum`` has no public API for this; the steps are those ``EnumType.__new__`` performs for each
    member, checked on CPython 3.10-3.13 (3.13 offers ``_add_member_``).
    """
    existing = cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = cls
    member._sort_order_ = len(cls._member_names_)
    if hasattr(cls, "_add_member_"):  # Python >= 3.13
        cls._add_member_(name, member)
    else:
        type.__setattr__(cls, name, member)  # EnumType.__setattr__ refuses to (re)bind members
        cls._member_map_[name] = member
    if name not in cls._member_names_:
        cls._member_names_.append(name)
    cls._value2member_map_[value] = member
    return member


def _register_handler(member: Any, handler: Any = _handler) -> bool:
    """Add ``handler`` for ``member`` to ``_OPTIMIZER_HANDLERS`` (5.2+). False if that registry does not exist."""
    if importlib.util.find_spec("transformers.trainer_optimizer") is None:
        return False
    from transformers import trainer_optimizer

    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(handlers, dict):
        return False
    current = handlers.get(member)
    if current is not None and not getattr(current, _MARK, False):
        logger.warning("transformers already has a handler for optim=%r; keeping it.", member.value)
        return True
    handlers[member] = handler
    return True


def _wrap_trainer() -> None:
    """Wrap the staticmethod ``Trainer.get_optimizer_cls_and_kwargs`` once (5.0 / 5.1 dispatch)."""
    from transformers import Trainer

    original = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    original = getattr(original, "__func__", original)
    if getattr(original, _MARK, False):
        return

    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        if is_q4shampoo_optim(args.optim):
            return make_optimizer_cls_and_kwargs(args, model)
        if is_q4adamw_optim(args.optim):
            return make_q4adamw_cls_and_kwargs(args, model)
        if is_sparse_mfac_optim(args.optim):
            return make_sparse_mfac_cls_and_kwargs(args, model)
        return original(args, model)

    get_optimizer_cls_and_kwargs.__doc__ = original.__doc__
    get_optimizer_cls_and_kwargs.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(get_optimizer_cls_and_kwargs, _MARK, True)
    Trainer.get_optimizer_cls_and_kwargs = staticmethod(get_optimizer_cls_and_kwargs)


def _wrap_training_arguments() -> None:
    """Wrap ``TrainingArguments.__post_init__`` once: our optimizers' ``optim_args`` are checked when the
    arguments are built (subclasses call it through ``super().__post_init__()``)."""
    from transformers import TrainingArguments

    original = TrainingArguments.__dict__["__post_init__"]
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        check_optim_args(self)

    setattr(__post_init__, _MARK, True)
    TrainingArguments.__post_init__ = __post_init__


_mode: RegistrationMode | None = None


def _register(mode: RegistrationMode | None = None) -> RegistrationMode:
    """:func:`register` with the dispatch mode forced (tests exercise the 5.0/5.1 wrapper on 5.2+)."""
    global _mode
    from transformers.training_args import OptimizerNames

    member = _extend_enum(OptimizerNames, _MEMBER_NAME, OPTIM_NAME)
    sparse_member = _extend_enum(OptimizerNames, _SPARSE_MFAC_MEMBER_NAME, SPARSE_MFAC_OPTIM_NAME)
    adamw_member = _extend_enum(OptimizerNames, _Q4ADAMW_MEMBER_NAME, Q4ADAMW_OPTIM_NAME)

    def add_handlers() -> bool:
        return (
            _register_handler(member)
            and _register_handler(sparse_member, _sparse_mfac_handler)
            and _register_handler(adamw_member, _q4adamw_handler)
        )

    if mode is None:
        if _mode is not None:
            return _mode
        mode = "handler_registry" if add_handlers() else "trainer_wrapper"
    elif mode == "handler_registry" and not add_handlers():
        raise RuntimeError("this transformers version has no trainer_optimizer._OPTIMIZER_HANDLERS")
    if mode == "trainer_wrapper":
        _wrap_trainer()
    _wrap_training_arguments()
    _mode = mode
    return mode


def register() -> RegistrationMode:
    """Make ``optim="q4shampoo"``, ``"q4adamw"`` and ``"sparse_mfac"`` work with stock ``TrainingArguments``,
    ``HfArgumentParser`` and ``Trainer``.

    ``import hf_q4shampoo`` already calls it. Run it before ``HfArgumentParser(...)`` is constructed
    (the parser freezes ``--optim``'s choices then). Additive and idempotent; returns how the name is
    dispatched: ``"handler_registry"`` (transformers >= 5.2) or ``"trainer_wrapper"`` (5.0 / 5.1).
    """
    return _register()


def is_registered() -> bool:
    """Whether ``q4shampoo``, ``q4adamw`` and ``sparse_mfac`` are ``OptimizerNames`` members dispatched by the
    Trainer."""
    if _mode is None:
        return False
    from transformers.training_args import OptimizerNames

    names = OptimizerNames._value2member_map_
    return all(n in names for n in (OPTIM_NAME, SPARSE_MFAC_OPTIM_NAME, Q4ADAMW_OPTIM_NAME))
