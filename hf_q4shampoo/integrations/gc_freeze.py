"""Keep Python's full garbage collections out of multi-GPU training steps: :class:`GCFreezeCallback`.

Why: a process with torch, transformers and a model loaded tracks ~420k Python objects, and one full
(generation-2) collection walks them all: 195-234 ms on a CPU core, 234-264 ms per rank on two H200s
(docs/perf_notes.md v22). Python starts one every few hundred steps, at a different step on each rank; under
DDP the other ranks wait for it in the next collective, so every rank's pause stalls all of them and the
stalls add up with the world size. ``gc.freeze()`` moves every object alive at that moment into a permanent
generation that collections skip; measured on two H200s, the one-off 230-280 ms steps vanished and
``shard_parameters``' optimizer time went 0.81x -> 0.77x of one GPU's.

What is frozen is only what is alive when the callback freezes: the model, the optimizer's state and compiled
kernels. Garbage made later is collected as usual (generations 0 and 1, and full collections that now skip
the frozen objects). ``on_train_end`` unfreezes, so objects that die after training are collected again.
Freezing again after the first steps also takes in what those steps create once (compiled graphs, Triton
kernels, CUDA-graph pools): by default after steps 1, 10 and 100, where every rank pauses at the same step.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

__all__ = ["DEFAULT_REFREEZE_STEPS", "GCFreezeCallback", "attach_to_new_trainers", "set_gc_freeze", "wants_gc_freeze"]

logger = logging.getLogger(__name__)

#: Steps after which the callback collects and freezes again (first compilations, graph trials, first roots).
DEFAULT_REFREEZE_STEPS: tuple[int, ...] = (1, 10, 100)


class GCFreezeCallback(TrainerCallback):
    """Collect and ``gc.freeze()`` when training begins and after ``refreeze_steps``; unfreeze when it ends.

    Attached by default to :class:`~hf_q4shampoo.Q4ShampooTrainer` when the run has several processes
    (``gc_freeze=None``); add it to a stock ``Trainer`` with ``callbacks=[GCFreezeCallback()]``. In a plain
    PyTorch loop, call ``gc.collect(); gc.freeze()`` after building the model and optimizer and again after
    the first steps.

    Args:
        refreeze_steps: global steps after which to collect and freeze again (each a full collection of the
            objects not yet frozen, at the same step on every rank). Positive integers; ``()`` freezes once.
    """

    def __init__(self, refreeze_steps: Iterable[int] = DEFAULT_REFREEZE_STEPS) -> None:
        steps = tuple(refreeze_steps)
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad:
            raise ValueError(f"GCFreezeCallback: refreeze_steps must be positive integers, got {bad!r}")
        self.refreeze_steps = frozenset(steps)
        self.frozen_objects = 0
        self.collect_ms: list[float] = []

    def _freeze(self) -> None:
        start = time.perf_counter()
        gc.collect()
        gc.freeze()
        self.collect_ms.append((time.perf_counter() - start) * 1e3)
        self.frozen_objects = gc.get_freeze_count()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self._freeze()
        logger.info("GCFreezeCallback: %d objects frozen out of garbage collection", self.frozen_objects)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if state.global_step in self.refreeze_steps:
            self._freeze()

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        gc.unfreeze()
        self.frozen_objects = 0


def set_gc_freeze(trainer: Any, wanted: bool) -> None:
    """Give ``trainer`` exactly one :class:`GCFreezeCallback` if ``wanted``, none otherwise."""
    present = [c for c in trainer.callback_handler.callbacks if isinstance(c, GCFreezeCallback)]
    if wanted and not present:
        trainer.add_callback(GCFreezeCallback())
    elif not wanted:
        for callback in present:
            trainer.remove_callback(callback)


#: Marks the wrapped ``Trainer.__init__`` so that wrapping twice is a no-op.
_WRAPPED = "_hf_q4shampoo_gc_freeze"


def attach_to_new_trainers() -> None:
    """Wrap ``Trainer.__init__`` once, in this process: a ``Trainer`` built afterwards that runs with several
    processes and selects ``q4shampoo``, ``q4adamw`` or ``sparse_mfac`` gets a :class:`GCFreezeCallback` (unless
    it has one). The launcher calls this when ``WORLD_SIZE`` > 1 and ``HF_Q4SHAMPOO_GC_FREEZE`` is not ``0``;
    other optimizers' runs are left alone."""
    from transformers import Trainer

    from .optimizer_args import is_q4adamw_optim, is_q4shampoo_optim, is_sparse_mfac_optim

    original = Trainer.__init__
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        optim = self.args.optim
        ours = is_q4shampoo_optim(optim) or is_q4adamw_optim(optim) or is_sparse_mfac_optim(optim)
        if ours and self.args.world_size > 1:
            set_gc_freeze(self, True)

    setattr(init, _WRAPPED, True)
    Trainer.__init__ = init


def launcher_wants_gc_freeze() -> bool:
    """Whether ``q4shampoo run`` wraps new Trainers (:func:`attach_to_new_trainers`): under a distributed launcher
    (``WORLD_SIZE`` > 1), unless ``HF_Q4SHAMPOO_GC_FREEZE=0``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("HF_Q4SHAMPOO_GC_FREEZE", "1") != "0"


def wants_gc_freeze(gc_freeze: Any, world_size: int) -> bool:
    """Whether a Trainer built with ``gc_freeze`` attaches :class:`GCFreezeCallback`.

    ``None`` (default): with more than one process, where one rank's collection stalls all ranks; ``True`` /
    ``False``: always / never.
    """
    if gc_freeze is None:
        return world_size > 1
    if not isinstance(gc_freeze, bool):
        raise TypeError(f"gc_freeze must be None, True or False, got {gc_freeze!r}")
    return gc_freeze
