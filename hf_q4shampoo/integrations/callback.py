"""Optimizer memory report for ``Trainer`` runs: :class:`MemoryReportCallback` and its helpers.

The callback works with any optimizer (so an AdamW run can be compared with a Q4Shampoo run) and any
``Trainer``:

* **train begin** - the pre-flight estimate of this optimizer's state for this model
  (:func:`hf_q4shampoo.estimate.estimate_optimizer_state`: meta tensors, nothing allocated), printed
  once on the main process;
* **every logging step** - the keys of :data:`LOG_KEYS` in the Trainer's own logs (and, for Q4Shampoo,
  :data:`SKIPPED_KEY`: the updates skipped so far for a NaN/inf gradient);
* **train end** - ``memory_report.json`` (schema: :class:`~hf_q4shampoo.integrations.report.MemoryReportJSON`),
  ``memory_report.md`` (tables a person reads) and ``memory_report.png`` (state by kind vs the AdamW /
  fp32-Shampoo equivalents, memory over steps) in ``output_dir``;
* **model card** - an "Optimizer memory" section in the ``README.md`` that ``create_model_card`` /
  ``push_to_hub`` write; rewritten in place on every call, never duplicated.

How the log keys reach the console, ``trainer_state.json`` and reporters
-------------------------------------------------------------------------
``Trainer.log`` appends a copy of ``logs`` to ``state.log_history`` and only then runs the callbacks'
``on_log``, reporting callbacks (TensorBoard, W&B, ...) before user callbacks; keys a callback adds in
``on_log`` therefore miss ``trainer_state.json`` and the reporters. Three ways, best first:

1. ``Q4ShampooTrainer``, or any ``class MyTrainer(MemoryReportMixin, Trainer)``: :class:`MemoryReportMixin`
   overrides ``log`` and adds the keys *before* ``Trainer.log`` runs, so they reach the console,
   ``log_history`` / ``trainer_state.json``, every reporter and the metrics ``train()`` returns. The mixin
   attaches a :class:`MemoryReportCallback` by default (opt out with ``memory_report=False``).
2. Stock ``Trainer``: :func:`attach_memory_report` ``(trainer)`` adds the callback and wraps *that
   instance's* ``log`` and ``create_model_card`` the same way. Same reach as 1; the trade-off is an
   instance-level wrapper: code that calls ``Trainer.log(trainer, ...)`` on the class bypasses it.
3. Stock ``Trainer(callbacks=[MemoryReportCallback()])`` alone: in ``on_log`` the callback adds the keys
   to ``logs`` (the console printer runs after it) and to the entry just appended to ``log_history`` (so
   ``trainer_state.json`` has them), but reporters that ran before it (TensorBoard, W&B, ...) miss them;
   it warns once when such reporters are configured. The report files are written in every case; the
   model-card section needs 1 or 2.

The pieces: ``probe.py`` measures device memory, ``report.py`` is the report's typed schema and builder,
``render.py`` writes what a person reads (Markdown, plot, model card); this module decides when to measure
and wires them to the Trainer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..config import STATE_LAYOUT_KEYS
from ..estimate import EstimateUnavailable, estimate_memory, estimate_optimizer_state
from ..memory import MemoryReport, format_bytes, optimizer_state_bytes, unwrap_optimizer
from ..optimizer import Q4Shampoo
from .probe import MemoryProbe
from .render import update_model_card, write_report_files
from .report import MIB, MemoryReportJSON, RunInfo, build_report, load_report, optimizer_label

__all__ = [
    "MemoryReportCallback",
    "MemoryReportMixin",
    "attach_memory_report",
    "memory_callback",
    "LOG_KEYS",
    "SKIPPED_KEY",
]

logger = logging.getLogger(__name__)

#: Keys added to the Trainer's training logs (``peak_<kind>_mib`` is named after the memory measured).
LOG_KEYS = {
    "optim_state_mib": "optimizer state now, MiB",
    "optim_state_bytes_per_param": "optimizer state per trainable parameter with state, bytes",
    "optim_state_fp32_shampoo_mib": "fp32 Shampoo with the same blocks (fp32 factors, roots, Adam m and v), MiB",
    "optim_state_adamw_mib": "AdamW with fp32 m and v, MiB",
    "optim_state_compression_vs_fp32_shampoo": "fp32-Shampoo equivalent / optimizer state",
    "optim_state_compression_vs_adamw": "AdamW equivalent / optimizer state",
    "peak_<kind>_mib": "peak memory since train begin: peak_cuda_mib / peak_xpu_mib / peak_mps_mib "
    "(allocator) or peak_rss_mib (CPU, process resident set)",
}


#: Added to the training logs of a Q4Shampoo run: parameter updates skipped so far for a NaN/inf gradient.
SKIPPED_KEY = "optim_skipped_updates"


def _round(x: float) -> float:
    return float(f"{x:.4g}")


class MemoryReportCallback(TrainerCallback):
    """Measures optimizer-state and device memory during training and writes the report files.

    Args:
        output_dir: where the report files go (default: ``args.output_dir``).
        write_files: write ``memory_report.json`` / ``.md`` / ``.png`` at train end (main process only).
        plot: write the PNG (needs matplotlib; skipped with a warning when it is missing).
        print_estimate: print the pre-flight estimate at train begin (main process only).
        compare_with: paths of other runs' ``memory_report.json`` (e.g. an AdamW run of the same model),
            drawn in the plot and listed in the Markdown report.
        largest: how many of the largest per-tensor states the report lists.
        max_history: most samples kept for the plot (the stride between sampled steps doubles when full).
        reset_peak: start the peak-memory measurement at train begin rather than process start.
        alternatives: add the ``estimate_memory`` rows (AdamW, 8-bit / 4-bit AdamW, fp32 Shampoo, Q4Shampoo
            forms) for this model to the report.

    Attach it with :class:`MemoryReportMixin` (``Q4ShampooTrainer`` does) or :func:`attach_memory_report`
    so the log keys reach every reporter; see the module docstring.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        *,
        write_files: bool = True,
        plot: bool = True,
        print_estimate: bool = True,
        compare_with: Sequence[str | os.PathLike] = (),
        largest: int = 10,
        max_history: int = 500,
        reset_peak: bool = True,
        alternatives: bool = True,
    ):
        if max_history < 2:
            raise ValueError("max_history must be at least 2")
        self.output_dir = output_dir
        self.write_files = write_files
        self.plot = plot
        self.print_estimate = print_estimate
        self.compare_with = [Path(p) for p in compare_with]
        self.largest = largest
        self.max_history = max_history
        self.reset_peak = reset_peak
        self.alternatives = alternatives
        self.report: dict[str, Any] | None = None  #: the last report built (train end)
        self.files: dict[str, Path] = {}  #: report files written, by kind ("json", "md", "png")
        self._reset()

    def _reset(self) -> None:
        self._opt: Any = None
        self._model_info: dict[str, Any] = {}
        self._names: dict[int, str] = {}
        self._probe = MemoryProbe()
        self._estimate: MemoryReport | None = None
        self._estimate_error: str | None = None
        self._alternatives: list[dict[str, Any]] = []
        self._history: list[dict[str, int]] = []
        self._stride = 1
        self._last: MemoryReport | None = None
        self._warned = False

    # ---- binding ---------------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        """Whether training began and the optimizer is known."""
        return self._opt is not None

    def bind(self, model: Any, optimizer: Any, device: torch.device | str | None = None) -> None:
        """Take the model and optimizer to report on (``on_train_begin`` does this)."""
        self._reset()
        self._opt = unwrap_optimizer(optimizer)
        self._probe = MemoryProbe(device)
        if model is not None:
            for name, p in model.named_parameters(remove_duplicate=False):
                self._names.setdefault(id(p), name)  # a tied weight keeps its first name
            trainable = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
            self._model_info = {
                "class": type(model).__name__,
                "num_params": sum({id(p): p.numel() for p in model.parameters()}.values()),
                "num_trainable": sum(trainable.values()),
            }
        try:
            self._estimate = estimate_optimizer_state(self._opt)
        except EstimateUnavailable as e:
            self._estimate_error = str(e)
        if self.alternatives and model is not None:
            options = self._opt.config.to_dict() if isinstance(self._opt, Q4Shampoo) else {}
            try:
                rows = estimate_memory(model, **_layout_options(options)).rows
                self._alternatives = [
                    {
                        "name": r.name,
                        "label": r.label,
                        "total_bytes": r.total_bytes,
                        "bytes_per_param": r.bytes_per_param,
                    }
                    for r in rows
                ]
            except ValueError as e:  # e.g. no trainable parameters
                logger.info("memory report: no alternatives estimate (%s)", e)

    # ---- measuring -------------------------------------------------------------------------------
    def measure(self) -> MemoryReport:
        """The optimizer's state right now (:func:`~hf_q4shampoo.memory.optimizer_state_bytes`)."""
        if not self.bound:
            raise RuntimeError("MemoryReportCallback has no optimizer yet: training has not begun.")
        report = optimizer_state_bytes(self._opt, largest=self.largest, param_names=self._names)
        self._last = report
        return report

    def _sample(self, step: int) -> None:
        state = self.measure().total
        self._history.append(
            {
                "step": step,
                "state_bytes": state,
                "memory_bytes": self._probe.sample(),
                "peak_memory_bytes": self._probe.peak(),
            }
        )
        if len(self._history) > self.max_history:
            # keep every other sample (the first and the latest always), then sample half as often
            self._stride *= 2
            keep = [h for h in self._history[1:-1] if h["step"] % self._stride == 0]
            self._history = [self._history[0], *keep, self._history[-1]]

    def log_metrics(self, logs: dict[str, Any] | None = None) -> dict[str, float]:
        """The :data:`LOG_KEYS` values now, for a training log (``loss``) or the final metrics (``train_runtime``).

        Returns ``{}`` for other logs (evaluation), before training begins, or when ``logs`` has them already.
        """
        if not self.bound or (logs is not None and ("optim_state_mib" in logs or not _is_train_log(logs))):
            return {}
        r = self.measure()
        total = max(1, r.total)
        return {
            "optim_state_mib": _round(r.total / MIB),
            "optim_state_bytes_per_param": _round(r.bytes_per_param),
            "optim_state_fp32_shampoo_mib": _round(r.fp32_shampoo_equivalent / MIB),
            "optim_state_adamw_mib": _round(r.adamw_equivalent / MIB),
            "optim_state_compression_vs_fp32_shampoo": _round(r.fp32_shampoo_equivalent / total),
            "optim_state_compression_vs_adamw": _round(r.adamw_equivalent / total),
            self._probe.log_key: _round(self._probe.peak() / MIB),
            **self._skipped(),
        }

    def _skipped(self) -> dict[str, int]:
        """``{SKIPPED_KEY: n}`` for an optimizer that counts skipped updates (reads device counters: logging only)."""
        skipped = getattr(unwrap_optimizer(self._opt), "skipped_updates", None)
        return {SKIPPED_KEY: int(skipped())} if callable(skipped) else {}

    # ---- TrainerCallback events --------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: D102
        if optimizer is None:
            logger.warning("MemoryReportCallback: the Trainer passed no optimizer; no memory report.")
            return
        self.bind(model, optimizer, device=getattr(args, "device", None))
        if self.reset_peak:
            self._probe.reset_peak()
        if self.print_estimate and state.is_world_process_zero:
            print(self.estimate_text(), flush=True)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102
        if not self.bound:
            return
        step = state.global_step
        if not self._history or step % self._stride == 0:
            self._sample(step)
        else:
            self._probe.sample()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        # Fallback for a stock Trainer without the log hook (see the module docstring, way 3).
        if logs is None:
            return
        extra = self.log_metrics(logs)
        if not extra:
            return
        logs.update(extra)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and _is_train_log(last):
            last.update(extra)
        reporters = [r for r in (args.report_to or []) if r != "none"]
        if reporters and not self._warned and state.is_world_process_zero:
            self._warned = True
            logger.warning(
                "MemoryReportCallback: the memory keys reach the console and trainer_state.json, not %s: "
                "use Q4ShampooTrainer, a Trainer subclass with MemoryReportMixin, or "
                "hf_q4shampoo.attach_memory_report(trainer).",
                ", ".join(reporters),
            )

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if not self.bound:
            return
        if not self._history or self._history[-1]["step"] != state.global_step:
            self._sample(state.global_step)
        self.report = self.build_report(args, state)
        if self.write_files and state.is_world_process_zero:
            self.files = write_report_files(self.report, self.output_dir or args.output_dir, plot=self.plot)

    # ---- the report ------------------------------------------------------------------------------
    def estimate_text(self) -> str:
        """The lines printed at train begin."""
        label = optimizer_label(self._opt)
        if self._estimate is None:
            return f"[hf_q4shampoo] {label}: no pre-flight estimate ({self._estimate_error})"
        e = self._estimate
        return (
            f"[hf_q4shampoo] Pre-flight estimate of optimizer state, {label}: {format_bytes(e.total)} "
            f"({e.bytes_per_param:.2f} bytes/param over {e.num_params:,} parameters). Same parameters with AdamW "
            f"(fp32 m, v): {format_bytes(e.adamw_equivalent)}; with fp32 Shampoo: "
            f"{format_bytes(e.fp32_shampoo_equivalent)}."
        )

    def build_report(self, args: Any = None, state: Any = None) -> MemoryReportJSON:
        """The ``memory_report.json`` content (:class:`~hf_q4shampoo.integrations.report.MemoryReportJSON`), now."""
        if not self.bound:
            raise RuntimeError("MemoryReportCallback has no optimizer yet: training has not begun.")
        measured = self._last if self._last is not None else self.measure()
        step = state.global_step if state is not None else (self._history[-1]["step"] if self._history else 0)
        run: RunInfo = {
            "output_dir": str(self.output_dir or getattr(args, "output_dir", "") or ""),
            "global_step": step,
            "max_steps": getattr(state, "max_steps", None),
            "world_size": getattr(args, "world_size", 1),
            "process_index": getattr(args, "process_index", 0),
        }
        return build_report(
            self._opt,
            measured,
            step=step,
            probe=self._probe,
            run=run,
            model=self._model_info or None,
            estimate=self._estimate,
            estimate_error=self._estimate_error,
            alternatives=self._alternatives,
            history=self._history,
            compare_with=self.compare_with,
        )


def _layout_options(config: dict[str, Any]) -> dict[str, Any]:
    """The Q4ShampooConfig fields that shape the state (for the alternatives estimate)."""
    return {k: v for k, v in config.items() if k in STATE_LAYOUT_KEYS}


def _is_train_log(logs: dict[str, Any]) -> bool:
    return "loss" in logs or "train_runtime" in logs


def _model_card_report(trainer: Any) -> MemoryReportJSON | None:
    cb = memory_callback(trainer)
    if cb is not None and cb.report is not None:
        return cb.report
    if cb is not None and cb.bound:
        return cb.build_report(trainer.args, trainer.state)
    try:
        return load_report(Path(cb.output_dir if cb and cb.output_dir else trainer.args.output_dir))
    except (OSError, ValueError):
        return None


def _add_model_card_section(trainer: Any) -> None:
    if not trainer.is_world_process_zero():
        return
    report = _model_card_report(trainer)
    if report is not None:
        update_model_card(Path(trainer.args.output_dir) / "README.md", report)


def memory_callback(trainer: Any) -> MemoryReportCallback | None:
    """The :class:`MemoryReportCallback` attached to ``trainer``, if any."""
    handler = getattr(trainer, "callback_handler", None)
    for cb in getattr(handler, "callbacks", []):
        if isinstance(cb, MemoryReportCallback):
            return cb
    return None


def _inject(trainer: Any, logs: dict[str, Any]) -> None:
    cb = memory_callback(trainer)
    if cb is not None:
        logs.update(cb.log_metrics(logs))


class MemoryReportMixin:
    """Puts the memory keys into the Trainer's own logs and the memory section into its model card.

    Place it before the Trainer class: ``class MyTrainer(MemoryReportMixin, Trainer)``
    (``Q4ShampooTrainer`` includes it). It attaches a :class:`MemoryReportCallback` unless one is already
    in ``callbacks``; ``memory_report=False`` opts out, and ``memory_report=MemoryReportCallback(...)``
    chooses its options.
    """

    def __init__(self, *args: Any, memory_report: bool | MemoryReportCallback = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if memory_report is not False and memory_callback(self) is None:
            cb = memory_report if isinstance(memory_report, MemoryReportCallback) else MemoryReportCallback()
            self.add_callback(cb)  # type: ignore[attr-defined]

    def log(self, logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the :data:`LOG_KEYS` added to training logs first."""
        _inject(self, logs)
        return super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def create_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The base ``create_model_card`` (Trainer's or TRL's signature), then the memory section."""
        result = super().create_model_card(*args, **kwargs)  # type: ignore[misc]
        _add_model_card_section(self)
        return result


def attach_memory_report(trainer: Any, callback: MemoryReportCallback | None = None) -> MemoryReportCallback:
    """Give a stock ``Trainer`` the memory report with full reach (way 2 in the module docstring).

    Adds ``callback`` (or a default :class:`MemoryReportCallback`) unless one is attached, and wraps this
    instance's ``log`` and ``create_model_card``; idempotent. Returns the attached callback.
    """
    cb = memory_callback(trainer)
    if cb is None:
        cb = callback or MemoryReportCallback()
        trainer.add_callback(cb)
    if isinstance(trainer, MemoryReportMixin) or getattr(trainer.log, "_hf_q4shampoo_memory", False):
        return cb
    original_log = trainer.log
    original_card = trainer.create_model_card

    def log(logs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        _inject(trainer, logs)
        return original_log(logs, *args, **kwargs)

    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        result = original_card(*args, **kwargs)
        _add_model_card_section(trainer)
        return result

    log._hf_q4shampoo_memory = True  # type: ignore[attr-defined]
    trainer.log = log
    trainer.create_model_card = create_model_card
    return cb
