"""Q4Shampoo in the transformers ``Trainer`` without global registration.

Three ways in (README, "Transformers"):

1. ``import hf_q4shampoo`` registers ``optim="q4shampoo"`` with stock transformers
   (:func:`~hf_q4shampoo.integrations.registration.register`; how it handles transformers 5.0 - 5.2x is
   explained there). ``q4shampoo run SCRIPT.py ...`` (:mod:`hf_q4shampoo.launcher`) does the same for
   unmodified scripts.
2. This module: :class:`Q4ShampooTrainingArguments` accepts ``optim="q4shampoo"`` as a plain string and
   :class:`Q4ShampooTrainer` dispatches it, with no change to transformers' own classes. Both are thin:
   a mixin each (:class:`Q4ShampooArgumentsMixin`, :class:`Q4ShampooTrainerMixin`) on the stock class, so
   the same mixins serve TRL (``Q4ShampooSFTConfig``, ``Q4ShampooSFTTrainer``, built on first access when
   TRL is installed) and any other ``Trainer`` subclass.
3. ``Trainer(optimizer_cls_and_kwargs=make_optimizer_cls_and_kwargs(args))``: no name at all.

Version notes: the Trainer mixin overrides the staticmethod ``get_optimizer_cls_and_kwargs(args,
model=None)``, whose signature is the same from transformers 5.0 to 5.23; ``create_optimizer`` is
deliberately not overridden (its signature changed within 5.x). The arguments mixin redeclares
``optim: str`` and passes a placeholder through ``TrainingArguments.__post_init__`` (which converts
``optim`` with ``OptimizerNames(...)``, in every 5.x), then puts ``"q4shampoo"`` back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainingArguments

from ..memory import unwrap_optimizer
from ..optimizer import Q4Shampoo
from .callback import MemoryReportMixin
from .gc_freeze import GCFreezeCallback, set_gc_freeze, wants_gc_freeze
from .optimizer_args import (
    OPTIM_NAME,
    Q4ADAMW_OPTIM_NAME,
    UnsupportedSetupError,
    check_optim_args,
    check_supported_setup,
    consolidate_for_save,
    is_q4adamw_optim,
    is_q4shampoo_optim,
    make_optimizer_cls_and_kwargs,
    make_q4adamw_cls_and_kwargs,
    saves_consolidated,
)
from .registration import register

__all__ = [
    "OPTIM_NAME",
    "GCFreezeCallback",
    "Q4ShampooArgumentsMixin",
    "Q4ShampooTrainer",
    "Q4ShampooTrainerMixin",
    "Q4ShampooTrainingArguments",
    "UnsupportedSetupError",
    "check_supported_setup",
    "make_optimizer_cls_and_kwargs",
    "register",
]

#: ``TrainingArguments``' own default (``adamw_torch_fused`` with torch >= 2.8), kept by the subclasses.
_BASE_OPTIM_DEFAULT = TrainingArguments.__dataclass_fields__["optim"].default
#: A built-in name with no side effects in ``__post_init__``, held by ``optim`` while the base class runs.
_PLACEHOLDER = "adamw_torch"


def _our_name(optim: Any) -> str | None:
    """``"q4shampoo"`` or ``"q4adamw"`` if ``optim`` selects one of them (the names the mixins accept), else None."""
    if is_q4shampoo_optim(optim):
        return OPTIM_NAME
    if is_q4adamw_optim(optim):
        return Q4ADAMW_OPTIM_NAME
    return None


@dataclass
class Q4ShampooArgumentsMixin:
    """Lets a ``TrainingArguments`` subclass accept ``optim="q4shampoo"`` (or ``"q4adamw"``) without global
    registration.

    Use as the first base of a dataclass: ``@dataclass class MyArgs(Q4ShampooArgumentsMixin,
    TrainingArguments)``. ``optim`` is redeclared as a plain ``str`` (so ``HfArgumentParser`` sets no
    ``choices``) and stays the plain string ``"q4shampoo"`` (so ``to_dict()``, JSON and
    ``training_args.bin`` need nothing registered); built-in names still become ``OptimizerNames``
    members and unknown names still raise transformers' ``ValueError``. ``optim_args`` of ``"q4shampoo"``
    are parsed and validated when the arguments are built (one-line ``ConfigError``).
    """

    optim: str = field(
        default=_BASE_OPTIM_DEFAULT,
        metadata={
            "help": f"The optimizer to use: '{OPTIM_NAME}' (4-bit Shampoo; options in --optim_args), "
            f"'{Q4ADAMW_OPTIM_NAME}' (paper 3's 4-bit AdamW) or any name of transformers' OptimizerNames."
        },
    )

    def __post_init__(self) -> None:
        ours = _our_name(self.optim)
        if ours:
            self.optim = _PLACEHOLDER
        try:
            super().__post_init__()  # type: ignore[misc]
        finally:
            if ours:
                self.optim = ours
        if ours:  # the base class saw the placeholder: check the options now, at argument parsing
            check_optim_args(self)

    def set_optimizer(self, name: Any = "adamw_torch", *args: Any, **kwargs: Any) -> Any:
        """``TrainingArguments.set_optimizer`` that also accepts ``"q4shampoo"`` and ``"q4adamw"``."""
        ours = _our_name(name)
        result = super().set_optimizer(_PLACEHOLDER if ours else name, *args, **kwargs)  # type: ignore[misc]
        if ours:
            self.optim = ours
            check_optim_args(self)
        return result


@dataclass
class Q4ShampooTrainingArguments(Q4ShampooArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` whose ``optim`` also accepts ``"q4shampoo"`` (options via ``optim_args``).

    Works with ``HfArgumentParser`` (command line, JSON, YAML, dict) whether or not
    :func:`~hf_q4shampoo.register` ran. Pair it with :class:`Q4ShampooTrainer`, or with the stock
    ``Trainer`` once ``q4shampoo`` is registered.
    """


class Q4ShampooTrainerMixin:
    """Dispatches ``args.optim == "q4shampoo"`` to :class:`~hf_q4shampoo.Q4Shampoo` (and ``"q4adamw"`` to
    :class:`~hf_q4shampoo.Q4AdamW`) in any ``Trainer`` subclass.

    Place it before the Trainer class in the bases: ``class MyTrainer(Q4ShampooTrainerMixin, Trainer)``.
    It overrides the staticmethod ``get_optimizer_cls_and_kwargs`` (the supported customisation hook), checks
    ``optim_args`` and the distributed setup when the trainer is built, so mistakes surface before training,
    and, under DDP, gathers Q4Shampoo's state before a checkpoint (``_save_optimizer_and_scheduler``). Other
    mixins (e.g. the memory report) can sit beside it in the bases.

    ``gc_freeze`` (keyword): attach a :class:`~hf_q4shampoo.integrations.gc_freeze.GCFreezeCallback`, which
    keeps Python's full garbage collections (~250 ms each, one rank's stalling every rank) out of training
    steps. ``None`` (default): when the run has several processes; ``True`` / ``False``: always / never.
    """

    def __init__(self, *args: Any, gc_freeze: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        world_size = int(getattr(self.args, "world_size", 1))  # type: ignore[attr-defined]
        # False also undoes the launcher's callback (attach_to_new_trainers)
        set_gc_freeze(self, wants_gc_freeze(gc_freeze, world_size))
        ours = getattr(self, "optimizer", None) is None and getattr(self, "optimizer_cls_and_kwargs", None) is None
        if ours and is_q4shampoo_optim(self.args.optim):  # type: ignore[attr-defined]
            make_optimizer_cls_and_kwargs(self.args)  # type: ignore[attr-defined]
        elif ours and is_q4adamw_optim(self.args.optim):  # type: ignore[attr-defined]
            make_q4adamw_cls_and_kwargs(self.args)  # type: ignore[attr-defined]

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """As the Trainer's, and tells a Q4Shampoo with an unknown run length how many steps the run has
        (epoch-based runs: ``max_steps`` is only known here), so its ``"auto"`` schedule fits the run."""
        super().create_optimizer_and_scheduler(num_training_steps)  # type: ignore[misc]
        optimizer = unwrap_optimizer(getattr(self, "optimizer", None))
        if isinstance(optimizer, Q4Shampoo) and optimizer.config.total_steps is None and num_training_steps > 0:
            optimizer.set_total_steps(num_training_steps)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's, after gathering Q4Shampoo's state into the ranks that write ``optimizer.pt``.

        Under DDP each rank keeps the statistics of its share of the matrices (``shard_preconditioners``), but
        the Trainer writes the optimizer state of the saving rank only (rank 0, or each node's first rank with
        ``save_on_each_node``). Every rank reaches this method, so the shares are gathered here (a collective)
        and ``optimizer.pt`` holds the whole, world-size-independent state: resuming loads it on every rank
        (each keeps its share), on any number of ranks. (With registration, the stock Trainer's method does the
        same, and then this one leaves it to it.)
        """
        if not saves_consolidated():
            consolidate_for_save(self)
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        """``(Q4Shampoo, kwargs)`` for ``optim="q4shampoo"``, ``(Q4AdamW, kwargs)`` for ``"q4adamw"``, else
        transformers' own choice."""
        if is_q4shampoo_optim(args.optim):
            return make_optimizer_cls_and_kwargs(args, model)
        if is_q4adamw_optim(args.optim):
            return make_q4adamw_cls_and_kwargs(args, model)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)


class Q4ShampooTrainer(Q4ShampooTrainerMixin, MemoryReportMixin, Trainer):
    """The stock ``Trainer`` that understands ``optim="q4shampoo"`` without global registration.

    It also reports optimizer memory (:class:`~hf_q4shampoo.integrations.callback.MemoryReportMixin`): a
    ``MemoryReportCallback`` is attached by default, its keys go into the Trainer's logs, the report files
    into ``output_dir`` and a section into the model card. ``memory_report=False`` opts out;
    ``memory_report=MemoryReportCallback(...)`` sets its options. With several processes it freezes Python's
    garbage collector during training (``gc_freeze``, :class:`Q4ShampooTrainerMixin`).
    """


# --------------------------------------------------------------------------------------------
# TRL variants, built on first access (TRL is optional)
# --------------------------------------------------------------------------------------------


def _build_trl_classes() -> dict[str, type]:
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        raise ImportError("Q4ShampooSFTConfig / Q4ShampooSFTTrainer need TRL: pip install trl") from err

    @dataclass
    class Q4ShampooSFTConfig(Q4ShampooArgumentsMixin, SFTConfig):
        """TRL's ``SFTConfig`` whose ``optim`` also accepts ``"q4shampoo"`` (SFT defaults kept)."""

    class Q4ShampooSFTTrainer(Q4ShampooTrainerMixin, MemoryReportMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` that understands ``optim="q4shampoo"`` without global registration."""

    classes: dict[str, type] = {"Q4ShampooSFTConfig": Q4ShampooSFTConfig, "Q4ShampooSFTTrainer": Q4ShampooSFTTrainer}
    for name, cls in classes.items():  # importable (and picklable) under this module's name
        cls.__module__ = __name__
        cls.__qualname__ = name
    return classes


def __getattr__(name: str) -> Any:
    if name in ("Q4ShampooSFTConfig", "Q4ShampooSFTTrainer"):
        classes = _build_trl_classes()
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
