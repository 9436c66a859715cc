"""Optimizer memory report for ``Trainer`` runs: :class:`MemoryReportCallback` and its helpers.

The callback works with any optimizer (so an AdamW run can be compared with a Q4Shampoo run) and any
``Trainer``:

* **train begin** - the pre-flight estimate of this optimizer's state for this model
  (:func:`hf_q4shampoo.estimate.estimate_optimizer_state`: meta tensors, nothing allocated), printed
  once on the main process;
* **every logging step** - the keys of :data:`LOG_KEYS` in the Trainer's own logs;
* **train end** - ``memory_report.json`` (schema below), ``memory_report.md`` (tables a person reads)
  and ``memory_report.png`` (state by kind vs the AdamW / fp32-Shampoo equivalents, memory over steps)
  in ``output_dir``;
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

``memory_report.json`` (schema ``hf_q4shampoo.memory_report/v1``; bytes are integers)
-------------------------------------------------------------------------------------
::

    schema            "hf_q4shampoo.memory_report/v1"
    created           ISO-8601 time (UTC)
    run               {output_dir, global_step, max_steps, world_size, process_index}
    model             {class, num_params, num_trainable}
    optimizer         {class, label, config (Q4ShampooConfig / SparseMFACConfig fields, or null), num_groups}
    device            {type, memory_kind ("cuda" | "xpu" | "mps" | "rss"), peak_since
                       ("train_begin" | "process_start"), log_key (e.g. "peak_rss_mib")}
    estimate          pre-flight estimate {total_bytes, bytes_per_param, num_params, by_kind, by_group}
                      or null; estimate_error says why when null
    measured          {step, total_bytes, bytes_per_param, num_params, num_tensors,
                       by_kind {statistics, roots, error_feedback, first_order, scales_diagonals, other,
                                indices, gram} (the last two: SparseMFAC only; see hf_q4shampoo.memory),
                       by_group [{index, num_params, bytes, bytes_per_param, lr (initial), weight_decay}],
                       largest [{name, shape, numel, bytes, bytes_per_param}]}
    estimate_relative_error   measured / estimate - 1, or null
    equivalents       {adamw_bytes, fp32_shampoo_bytes, compression_vs_adamw, compression_vs_fp32_shampoo}
                      (compression = equivalent / measured; same block plan; see hf_q4shampoo.memory)
    alternatives      [{name, label, total_bytes, bytes_per_param}]: estimate_memory rows for this
                      model's trainable parameters (AdamW, 8-bit / 4-bit AdamW, fp32 Shampoo, Q4Shampoo forms)
    peak_memory_bytes peak of device.memory_kind over the run
    history           [{step, state_bytes, memory_bytes, peak_memory_bytes}], at most max_history
                      entries (the sampling stride doubles when full)
    compared          [{label, path, total_bytes, bytes_per_param, peak_memory_bytes}]: the reports given
                      in compare_with
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..estimate import EstimateUnavailable, estimate_memory, estimate_optimizer_state
from ..memory import KINDS, MemoryReport, format_bytes, optimizer_state_bytes, unwrap_optimizer
from ..optimizer import Q4Shampoo
from ..sparse_mfac import SparseMFAC

__all__ = [
    "MemoryReportCallback",
    "MemoryReportMixin",
    "MemoryProbe",
    "attach_memory_report",
    "memory_callback",
    "LOG_KEYS",
    "SCHEMA",
    "REPORT_FILES",
    "render_markdown",
    "plot_memory_report",
    "write_report_files",
    "model_card_section",
    "update_model_card",
    "load_report",
]

logger = logging.getLogger(__name__)

SCHEMA = "hf_q4shampoo.memory_report/v1"
REPORT_FILES = {"json": "memory_report.json", "md": "memory_report.md", "png": "memory_report.png"}
MIB = 2**20

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

_MARK_START = "<!-- hf_q4shampoo:memory-report:start -->"
_MARK_END = "<!-- hf_q4shampoo:memory-report:end -->"


# ----------------------------------------------------------------------------------------------
# device memory
# ----------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _ru_maxrss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


class MemoryProbe:
    """Current and peak memory of the training device.

    CUDA / XPU: the caching allocator's allocated bytes and their peak. MPS: allocated bytes; the peak
    is the largest value sampled (MPS keeps no peak). CPU: the process's resident set (RSS); the peak is
    the kernel's high-water mark (``VmHWM``), which :meth:`reset_peak` resets through
    ``/proc/self/clear_refs`` on Linux; elsewhere it is ``ru_maxrss``, the peak since process start.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cpu")
        self.kind = self.device.type if self.device.type in ("cuda", "xpu", "mps") else "rss"
        self.peak_since = "process_start"
        self._sampled_peak = 0

    @property
    def log_key(self) -> str:
        return f"peak_{self.kind}_mib"

    def _backend(self) -> Any:
        return getattr(torch, self.kind)

    def reset_peak(self) -> None:
        """Start the peak afresh (called at train begin)."""
        if self.kind in ("cuda", "xpu"):
            self._backend().reset_peak_memory_stats(self.device)
            self.peak_since = "train_begin"
        elif self.kind == "mps":
            self.peak_since = "train_begin"
        else:
            try:  # "5" resets the peak RSS (Linux >= 4.0, Documentation/filesystems/proc.rst)
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
                self.peak_since = "train_begin"
            except OSError:
                self.peak_since = "process_start"
        self._sampled_peak = 0
        self.sample()

    def current(self) -> int:
        if self.kind in ("cuda", "xpu"):
            return int(self._backend().memory_allocated(self.device))
        if self.kind == "mps":
            return int(torch.mps.current_allocated_memory())
        rss = _proc_status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return _ru_maxrss_bytes()

    def sample(self) -> int:
        """Read the current value and fold it into the sampled peak."""
        now = self.current()
        self._sampled_peak = max(self._sampled_peak, now)
        return now

    def peak(self) -> int:
        if self.kind in ("cuda", "xpu"):
            backend = int(self._backend().max_memory_allocated(self.device))
        elif self.kind == "mps":
            backend = 0
        else:
            hwm = _proc_status_kib("VmHWM")
            backend = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()
        return max(backend, self._sampled_peak)


# ----------------------------------------------------------------------------------------------
# the callback
# ----------------------------------------------------------------------------------------------


def _optimizer_label(opt: Any) -> str:
    if isinstance(opt, Q4Shampoo):
        c = opt.config
        bits = "" if c.first_order_bits == 4 else f", {c.first_order_bits}-bit {c.first_order}"
        return f"Q4Shampoo ({c.precond}{bits})"
    if isinstance(opt, SparseMFAC):
        c = opt.config
        kept = f"rank {c.rank}" if c.variant == "lowrank" else (f"k={c.k}" if c.k is not None else f"k={c.k_fraction:g}d")
        return f"SparseMFAC ({c.variant}, m={c.m}, {kept})"
    return type(opt).__name__


def _report_dict(r: MemoryReport) -> dict[str, Any]:
    return {
        "total_bytes": r.total,
        "bytes_per_param": r.bytes_per_param,
        "num_params": r.num_params,
        "num_tensors": r.num_tensors,
        "by_kind": dict(r.by_kind),
    }


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
                    {"name": r.name, "label": r.label, "total_bytes": r.total_bytes, "bytes_per_param": r.bytes_per_param}
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
            {"step": step, "state_bytes": state, "memory_bytes": self._probe.sample(), "peak_memory_bytes": self._probe.peak()}
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
        }

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
        label = _optimizer_label(self._opt)
        if self._estimate is None:
            return f"[hf_q4shampoo] {label}: no pre-flight estimate ({self._estimate_error})"
        e = self._estimate
        return (
            f"[hf_q4shampoo] Pre-flight estimate of optimizer state, {label}: {format_bytes(e.total)} "
            f"({e.bytes_per_param:.2f} bytes/param over {e.num_params:,} parameters). Same parameters with AdamW "
            f"(fp32 m, v): {format_bytes(e.adamw_equivalent)}; with fp32 Shampoo: "
            f"{format_bytes(e.fp32_shampoo_equivalent)}."
        )

    def build_report(self, args: Any = None, state: Any = None) -> dict[str, Any]:
        """The ``memory_report.json`` content (schema in the module docstring), measured now."""
        if not self.bound:
            raise RuntimeError("MemoryReportCallback has no optimizer yet: training has not begun.")
        r = self._last if self._last is not None else self.measure()
        step = state.global_step if state is not None else (self._history[-1]["step"] if self._history else 0)
        groups = []
        for i, (group, nbytes, nparams) in enumerate(zip(self._opt.param_groups, r.by_group, r.group_num_params)):
            lr = group.get("initial_lr", group.get("lr"))  # schedulers keep the configured value here
            groups.append({
                "index": i,
                "num_params": nparams,
                "bytes": nbytes,
                "bytes_per_param": nbytes / nparams if nparams else 0.0,
                "lr": float(lr) if lr is not None else None,
                "weight_decay": group.get("weight_decay"),
            })
        estimate = None
        if self._estimate is not None:
            estimate = {**_report_dict(self._estimate), "by_group": list(self._estimate.by_group)}
        total = max(1, r.total)
        report = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "run": {
                "output_dir": str(self.output_dir or getattr(args, "output_dir", "") or ""),
                "global_step": step,
                "max_steps": getattr(state, "max_steps", None),
                "world_size": getattr(args, "world_size", 1),
                "process_index": getattr(args, "process_index", 0),
            },
            "model": self._model_info or None,
            "optimizer": {
                "class": type(self._opt).__name__,
                "label": _optimizer_label(self._opt),
                "config": _jsonable(self._opt.config.to_dict()) if isinstance(self._opt, (Q4Shampoo, SparseMFAC)) else None,
                "num_groups": len(self._opt.param_groups),
            },
            "device": {
                "type": self._probe.device.type,
                "memory_kind": self._probe.kind,
                "peak_since": self._probe.peak_since,
                "log_key": self._probe.log_key,
            },
            "estimate": estimate,
            "estimate_error": self._estimate_error,
            "measured": {
                "step": step,
                **_report_dict(r),
                "by_group": groups,
                "largest": r.largest,
            },
            "estimate_relative_error": (r.total / self._estimate.total - 1.0) if self._estimate and self._estimate.total else None,
            "equivalents": {
                "adamw_bytes": r.adamw_equivalent,
                "fp32_shampoo_bytes": r.fp32_shampoo_equivalent,
                "compression_vs_adamw": r.adamw_equivalent / total,
                "compression_vs_fp32_shampoo": r.fp32_shampoo_equivalent / total,
            },
            "alternatives": self._alternatives,
            "peak_memory_bytes": self._probe.peak(),
            "history": list(self._history),
            "compared": [_compared_entry(p) for p in self.compare_with],
        }
        return report


def _layout_options(config: dict[str, Any]) -> dict[str, Any]:
    """The Q4ShampooConfig fields that shape the state (for the alternatives estimate)."""
    from ..config import STATE_LAYOUT_KEYS

    return {k: v for k, v in config.items() if k in STATE_LAYOUT_KEYS}


def _is_train_log(logs: dict[str, Any]) -> bool:
    return "loss" in logs or "train_runtime" in logs


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _compared_entry(path: Path) -> dict[str, Any]:
    other = load_report(path)
    return {
        "label": other["optimizer"]["label"],
        "path": str(path),
        "total_bytes": other["measured"]["total_bytes"],
        "bytes_per_param": other["measured"]["bytes_per_param"],
        "peak_memory_bytes": other["peak_memory_bytes"],
        "memory_kind": other["device"]["memory_kind"],
        "history": other["history"],
    }


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``memory_report.json`` (a file or the folder holding it), checking its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILES["json"]
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} report (schema: {report.get('schema')!r}).")
    return report


# ----------------------------------------------------------------------------------------------
# files: JSON, Markdown, PNG
# ----------------------------------------------------------------------------------------------


def write_report_files(report: dict[str, Any], output_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Write ``memory_report.json`` / ``.md`` / ``.png`` into ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / REPORT_FILES["json"], "md": out / REPORT_FILES["md"]}
    files["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    files["md"].write_text(render_markdown(report), encoding="utf-8")
    if plot:
        try:
            plot_memory_report(report, out / REPORT_FILES["png"])
            files["png"] = out / REPORT_FILES["png"]
        except ImportError:
            logger.warning("memory report: matplotlib is not installed; no memory_report.png.")
    return files


def _mib(n: float) -> str:
    return f"{n / MIB:,.2f} MiB"


def _memory_name(kind: str, since: str) -> str:
    what = {"rss": "RSS (CPU process)", "cuda": "CUDA allocated", "xpu": "XPU allocated", "mps": "MPS allocated"}[kind]
    return f"Peak {what}" + (", since train begin" if since == "train_begin" else ", since process start")


def _summary_rows(report: dict[str, Any]) -> list[str]:
    m, eq = report["measured"], report["equivalents"]
    n = max(1, m["num_params"])
    rows = [
        "| | state | bytes / param | vs this run |",
        "|---|---:|---:|---:|",
        f"| **this run: {report['optimizer']['label']}, measured at step {m['step']}** | "
        f"**{_mib(m['total_bytes'])}** | **{m['bytes_per_param']:.2f}** | 1.00x |",
    ]
    if report.get("estimate"):
        e = report["estimate"]
        err = report["estimate_relative_error"]
        rows.append(f"| pre-flight estimate (measured differs by {err:+.2%}) | {_mib(e['total_bytes'])} | "
                    f"{e['bytes_per_param']:.2f} | {e['total_bytes'] / max(1, m['total_bytes']):.2f}x |")
    for label, b in (("fp32 Shampoo, same blocks (equivalent)", eq["fp32_shampoo_bytes"]),
                     ("AdamW, fp32 m and v (equivalent)", eq["adamw_bytes"])):
        rows.append(f"| {label} | {_mib(b)} | {b / n:.2f} | {b / max(1, m['total_bytes']):.2f}x |")
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    """``memory_report.md``: summary, by kind, by group, largest tensors, other optimizers, compared runs."""
    m, eq, dev = report["measured"], report["equivalents"], report["device"]
    model = report.get("model") or {}
    lines = ["# Optimizer memory report", ""]
    head = f"{model.get('class', 'model')}, {m['num_params']:,} parameters with optimizer state" if model else ""
    lines.append(f"{head}; {report['optimizer']['label']}; device {dev['type']}; step {m['step']}; {report['created']}.")
    lines += ["", *_summary_rows(report), ""]
    lines.append(
        f"Compression: **{eq['compression_vs_fp32_shampoo']:.2f}x** vs fp32 Shampoo, "
        f"**{eq['compression_vs_adamw']:.2f}x** vs AdamW. "
        f"{_memory_name(dev['memory_kind'], dev['peak_since'])}: {_mib(report['peak_memory_bytes'])}."
    )
    lines += ["", "## By state kind", "", "| kind | state | share |", "|---|---:|---:|"]
    total = max(1, m["total_bytes"])
    for kind in KINDS:
        b = m["by_kind"].get(kind, 0)
        lines.append(f"| {kind} | {_mib(b)} | {b / total:.1%} |")
    lines += ["", "## By parameter group", "",
              "| group | parameters | state | bytes / param | lr (initial) | weight_decay |", "|---|---:|---:|---:|---:|---:|"]
    for g in m["by_group"]:
        lr = "" if g["lr"] is None else f"{g['lr']:.3g}"
        lines.append(f"| {g['index']} | {g['num_params']:,} | {_mib(g['bytes'])} | {g['bytes_per_param']:.2f} | "
                     f"{lr} | {g['weight_decay']} |")
    lines += ["", f"## Largest tensors ({len(m['largest'])})", "",
              "| parameter | shape | state | bytes / param |", "|---|---|---:|---:|"]
    for t in m["largest"]:
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"| {t.get('name', '?')} | {shape} | {_mib(t['bytes'])} | {t['bytes_per_param']:.2f} |")
    if report.get("alternatives"):
        lines += ["", "## Other optimizers for these parameters (pre-flight estimates)", "",
                  "| optimizer | state | bytes / param |", "|---|---:|---:|"]
        for a in report["alternatives"]:
            lines.append(f"| {a['label']} | {_mib(a['total_bytes'])} | {a['bytes_per_param']:.2f} |")
        lines += ["", "How each is computed: `hf_q4shampoo/estimate.py` (module docstring)."]
    if report.get("compared"):
        lines += ["", "## Compared runs (measured)", "", "| run | state | bytes / param | peak memory |",
                  "|---|---:|---:|---:|"]
        lines.append(f"| {report['optimizer']['label']} (this run) | {_mib(m['total_bytes'])} | "
                     f"{m['bytes_per_param']:.2f} | {_mib(report['peak_memory_bytes'])} |")
        for c in report["compared"]:
            lines.append(f"| {c['label']} (`{c['path']}`) | {_mib(c['total_bytes'])} | {c['bytes_per_param']:.2f} | "
                         f"{_mib(c['peak_memory_bytes'])} |")
    if report.get("estimate_error"):
        lines += ["", f"No pre-flight estimate: {report['estimate_error']}"]
    lines += ["", f"Machine-readable: `{REPORT_FILES['json']}` (schema `{SCHEMA}`).", ""]
    return "\n".join(lines)


_KIND_COLORS = {
    "statistics": "#4C72B0",
    "roots": "#55A868",
    "error_feedback": "#8172B2",
    "first_order": "#DD8452",
    "scales_diagonals": "#CCB974",
    "other": "#8C8C8C",
    "indices": "#64B5CD",
    "gram": "#C44E52",
}


def plot_memory_report(report: dict[str, Any], path: str | os.PathLike, compare: Iterable[dict[str, Any]] = ()) -> Path:
    """Draw ``memory_report.png``: state by kind vs the equivalents (left), memory over steps (right).

    Uses matplotlib's object API with the Agg canvas, so the caller's pyplot backend is untouched.
    ``compare`` adds other reports (their measured totals and memory curves); the report's own
    ``compared`` entries are drawn too.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m, eq, dev = report["measured"], report["equivalents"], report["device"]
    others = list(report.get("compared") or []) + [
        {"label": c["optimizer"]["label"], "total_bytes": c["measured"]["total_bytes"],
         "bytes_per_param": c["measured"]["bytes_per_param"], "history": c["history"]}
        for c in compare
    ]
    fig = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax_mem = fig.subplots(1, 2, width_ratios=[1.1, 1])
    n = max(1, m["num_params"])

    # left: horizontal bars, this run stacked by kind
    bars = [("AdamW (fp32 m, v)\nequivalent", eq["adamw_bytes"], "#BBBBBB"),
            ("fp32 Shampoo\n(same blocks) equivalent", eq["fp32_shampoo_bytes"], "#999999")]
    bars += [(f"{o['label']}\n(measured, other run)", o["total_bytes"], "#C44E52") for o in others]
    labels = [b[0] for b in bars] + [f"{report['optimizer']['label']}\n(this run, measured)"]
    for y, (_, value, color) in enumerate(bars):
        ax_bar.barh(y, value / MIB, color=color, height=0.6)
    left = 0.0
    y_run = len(bars)
    for kind in KINDS:
        value = m["by_kind"].get(kind, 0) / MIB
        if value > 0:
            ax_bar.barh(y_run, value, left=left, color=_KIND_COLORS[kind], height=0.6, label=kind)
            left += value
    values = [b[1] for b in bars] + [m["total_bytes"]]
    xmax = max(values) / MIB
    for y, value in enumerate(values):
        ax_bar.text(value / MIB + xmax * 0.01, y, f"{value / MIB:,.1f} MiB\n{value / n:.2f} B/param",
                    va="center", fontsize=8)
    ax_bar.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_bar.set_xlim(0, xmax * 1.3)
    ax_bar.set_xlabel("optimizer state (MiB)")
    ax_bar.set_title(f"Optimizer state: {eq['compression_vs_fp32_shampoo']:.1f}x smaller than fp32 Shampoo, "
                     f"{eq['compression_vs_adamw']:.1f}x vs AdamW", fontsize=9)
    ax_bar.legend(fontsize=7, loc="lower right", title="this run, by kind", title_fontsize=7)

    # right: memory over steps
    hist = report["history"]
    steps = [h["step"] for h in hist]
    peak = [h["peak_memory_bytes"] / MIB for h in hist]
    ax_mem.plot(steps, peak, color="#4C72B0", lw=2, marker="o", ms=3, label=f"{report['optimizer']['label']}: peak")
    ax_mem.plot(steps, [h["memory_bytes"] / MIB for h in hist], color="#4C72B0", lw=1, alpha=0.5, label="current")
    for name, equiv, style in (("AdamW", eq["adamw_bytes"], "--"), ("fp32 Shampoo", eq["fp32_shampoo_bytes"], ":")):
        shifted = [(h["peak_memory_bytes"] - h["state_bytes"] + equiv) / MIB for h in hist]
        ax_mem.plot(steps, shifted, color="#555555", ls=style, lw=1.2, label=f"same run with {name} state (est.)")
    for o in others:
        if o.get("history"):
            ax_mem.plot([h["step"] for h in o["history"]], [h["peak_memory_bytes"] / MIB for h in o["history"]],
                        color="#C44E52", lw=2, marker="s", ms=3, label=f"{o['label']}: peak (other run)")
    ax_mem.set_xlabel("step")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title(_memory_name(dev["memory_kind"], dev["peak_since"]), fontsize=9)
    ax_mem.legend(fontsize=7, loc="best")
    ax_mem.grid(alpha=0.3)

    model = report.get("model") or {}
    fig.suptitle(f"{model.get('class', 'model')}: {m['num_params']:,} parameters with state; step {m['step']}; "
                 f"{dev['type']}", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# model card
# ----------------------------------------------------------------------------------------------


def model_card_section(report: dict[str, Any]) -> str:
    """The "Optimizer memory" block, between markers so it can be replaced."""
    m, eq, dev = report["measured"], report["equivalents"], report["device"]
    lines = [
        _MARK_START,
        "## Optimizer memory",
        "",
        f"Trained with {report['optimizer']['label']}; optimizer state measured at step {m['step']} by "
        "`hf_q4shampoo`'s `MemoryReportCallback`.",
        "",
        *_summary_rows(report),
        "",
        "| state kind | bytes |",
        "|---|---:|",
        *[f"| {k} | {_mib(m['by_kind'].get(k, 0))} |" for k in KINDS if m["by_kind"].get(k, 0)],
        "",
        f"{_memory_name(dev['memory_kind'], dev['peak_since'])}: "
        f"{_mib(report['peak_memory_bytes'])}. Compression: {eq['compression_vs_fp32_shampoo']:.2f}x vs fp32 "
        f"Shampoo, {eq['compression_vs_adamw']:.2f}x vs AdamW.",
        _MARK_END,
    ]
    return "\n".join(lines)


def update_model_card(readme: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Add or replace the memory section in the model card ``readme`` (created if missing)."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = model_card_section(report)
    pattern = re.compile(re.escape(_MARK_START) + r".*?" + re.escape(_MARK_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _model_card_report(trainer: Any) -> dict[str, Any] | None:
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


# ----------------------------------------------------------------------------------------------
# Trainer side: the mixin and the stock-Trainer hook
# ----------------------------------------------------------------------------------------------


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
