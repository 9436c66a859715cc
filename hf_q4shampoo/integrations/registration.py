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

What the handlers call (``TrainingArguments`` -> each optimizer's keyword arguments, the refused setups) is
:mod:`~hf_q4shampoo.integrations.optimizer_args`; import those names from there.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any, Literal

from ..optimizer import Q4Shampoo
from ..q4adamw import Q4AdamW
from ..sparse_mfac import SparseMFAC
from .optimizer_args import (
    OPTIM_NAME,
    Q4ADAMW_OPTIM_NAME,
    SPARSE_MFAC_OPTIM_NAME,
    check_optim_args,
    is_q4adamw_optim,
    is_q4shampoo_optim,
    is_sparse_mfac_optim,
    make_optimizer_cls_and_kwargs,
    make_q4adamw_cls_and_kwargs,
    make_sparse_mfac_cls_and_kwargs,
)

__all__ = ["RegistrationMode", "is_registered", "register"]

logger = logging.getLogger(__name__)

#: ``OptimizerNames`` members of ``OPTIM_NAME``, ``SPARSE_MFAC_OPTIM_NAME`` and ``Q4ADAMW_OPTIM_NAME``.
_MEMBER_NAME = "Q4SHAMPOO"
_SPARSE_MFAC_MEMBER_NAME = "SPARSE_MFAC"
_Q4ADAMW_MEMBER_NAME = "Q4ADAMW"

RegistrationMode = Literal["handler_registry", "trainer_wrapper"]
_MARK = "_q4shampoo_handler"  # attribute set on our handler / wrapper functions


# --------------------------------------------------------------------------------------------
# ``_OPTIMIZER_HANDLERS`` entries (transformers >= 5.2)
# --------------------------------------------------------------------------------------------


def _handler(ctx: Any) -> tuple[type[Q4Shampoo], dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS`` entry (transformers >= 5.2). ``ctx`` is an ``OptimizerContext``.

    ``ctx.optim_args`` is transformers' untyped string dict; the original text in ``ctx.args`` is
    parsed again with our typed parser.
    """
    return make_optimizer_cls_and_kwargs(ctx.args, ctx.model)


setattr(_handler, _MARK, True)


def _q4adamw_handler(ctx: Any) -> tuple[type[Q4AdamW], dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS`` entry for ``q4adamw`` (transformers >= 5.2)."""
    return make_q4adamw_cls_and_kwargs(ctx.args, ctx.model)


setattr(_q4adamw_handler, _MARK, True)


def _sparse_mfac_handler(ctx: Any) -> tuple[type[SparseMFAC], dict[str, Any]]:
    """``_OPTIMIZER_HANDLERS`` entry for ``sparse_mfac`` (transformers >= 5.2)."""
    return make_sparse_mfac_cls_and_kwargs(ctx.args, ctx.model)


setattr(_sparse_mfac_handler, _MARK, True)


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
