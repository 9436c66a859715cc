"""The part every recipe shares after the Trainer is built: train, evaluate, save metrics, model card.

It follows transformers' example scripts (``run_glue.py``, ``run_clm.py``): ``trainer.train`` with an
optional resume, ``save_model``, ``log_metrics`` / ``save_metrics`` / ``save_state``, then
``push_to_hub`` or ``create_model_card``. Every run leaves ``all_results.json`` in ``output_dir``; the
GPU batch script collects those files.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import transformers
from transformers import Trainer, TrainingArguments

__all__ = ["setup_logging", "apply_runtime_defaults", "train_and_evaluate"]

logger = logging.getLogger(__name__)


class _PlainText(logging.Filter):
    """Drops ANSI escapes from records when the output is not a terminal (transformers' "LOAD REPORT" line
    writes a bold escape unconditionally, which shows as ``[1m`` in a log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not (sys.stderr.isatty() and sys.stdout.isatty()):
            record.msg = _ANSI.sub("", record.msg)
        return True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def setup_logging(training_args: TrainingArguments) -> None:
    """Log the recipe's own messages at INFO on the main process, and transformers at ``--log_level``.

    transformers stays at its default (warnings) unless ``--log_level`` asks for more, so a run does not open
    with the ~200-line ``TrainingArguments`` dump nor end on the model card's INFO lines; ``--log_level info``
    gives the example scripts' full log.
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    ours = logging.INFO if training_args.should_log else logging.WARNING
    if training_args.should_log and training_args.log_level in ("debug", "detail"):
        ours = logging.DEBUG
    for name in ("__main__", "hf_q4shampoo", "recipes_support"):
        logging.getLogger(name).setLevel(ours)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    for handler in transformers.utils.logging.get_logger().handlers:
        if not any(isinstance(f, _PlainText) for f in handler.filters):
            handler.addFilter(_PlainText())


def apply_runtime_defaults(training_args: TrainingArguments) -> None:
    """Settings that only make sense with an accelerator: no pinned host memory without one (the DataLoader
    would warn about it at every epoch and evaluation)."""
    if training_args.dataloader_pin_memory and not _has_accelerator():
        training_args.dataloader_pin_memory = False


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def train_and_evaluate(
    trainer: Trainer,
    training_args: TrainingArguments,
    num_train_samples: int,
    num_eval_samples: int,
    extra_evaluation: Callable[[], dict[str, float]] | None = None,
    model_card_kwargs: dict[str, Any] | None = None,
    report_perplexity: bool = False,
) -> dict[str, Any]:
    """Run ``do_train`` / ``do_eval`` as requested and return every metric (also in ``all_results.json``).

    ``extra_evaluation`` adds metrics that ``Trainer.evaluate`` cannot compute (e.g. exact match of
    generated answers); they are reported under the ``eval_`` prefix. ``report_perplexity`` adds
    ``eval_perplexity = exp(eval_loss)`` (language models).
    """
    results: dict[str, Any] = {
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optim_args": training_args.optim_args,
    }
    if training_args.do_train:
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = num_train_samples
        metrics["train_wall_seconds"] = round(time.perf_counter() - start, 2)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        if extra_evaluation is not None:
            metrics.update({f"eval_{k}": v for k, v in extra_evaluation().items()})
        metrics["eval_samples"] = num_eval_samples
        if report_perplexity and "eval_loss" in metrics:
            try:
                metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
            except OverflowError:
                metrics["eval_perplexity"] = float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", results, combined=False)
    kwargs = dict(model_card_kwargs or {})
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    elif training_args.do_train:
        trainer.create_model_card(**kwargs)
    return results
