"""The ``memory_report.json`` schema (``hf_q4shampoo.memory_report/v1``) as typed structures, and its builder.

:class:`MemoryReportJSON` and the ``TypedDict`` classes it nests *are* the schema: a report is a plain dict
(JSON as written), typed by them; :func:`build_report` fills one from a measured
:class:`~hf_q4shampoo.memory.MemoryReport`, the pre-flight estimate and the device probe. Bytes are integers.
The Trainer side (when to measure) is ``callback.py``; rendering it (Markdown, plot, model card) is ``render.py``.
No transformers import.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from ..memory import MemoryReport
from ..optimizer import Q4Shampoo
from ..q4adamw import Q4AdamW
from ..sparse_mfac import SparseMFAC
from .probe import MemoryProbe

__all__ = [
    "SCHEMA",
    "REPORT_FILES",
    "MemoryReportJSON",
    "build_report",
    "load_report",
    "optimizer_label",
    "state_summary",
]

SCHEMA = "hf_q4shampoo.memory_report/v1"
REPORT_FILES = {"json": "memory_report.json", "md": "memory_report.md", "png": "memory_report.png"}
MIB = 2**20


class RunInfo(TypedDict):
    output_dir: str
    global_step: int
    max_steps: int | None
    world_size: int
    process_index: int


#: ``class``: the model's class name.
ModelInfo = TypedDict("ModelInfo", {"class": str, "num_params": int, "num_trainable": int})

#: ``class``: the optimizer's class name; ``config``: its Q4ShampooConfig / Q4AdamWConfig / SparseMFACConfig
#: fields, or None.
OptimizerInfo = TypedDict(
    "OptimizerInfo", {"class": str, "label": str, "config": "dict[str, Any] | None", "num_groups": int}
)


class DeviceInfo(TypedDict):
    type: str
    memory_kind: str  # "cuda" | "xpu" | "mps" | "rss"
    peak_since: str  # "train_begin" | "process_start"
    log_key: str  # e.g. "peak_rss_mib"


class StateSummary(TypedDict):
    total_bytes: int
    bytes_per_param: float
    num_params: int
    num_tensors: int
    by_kind: dict[str, int]  # hf_q4shampoo.memory.KINDS (indices, gram: SparseMFAC only)


class EstimateInfo(StateSummary):
    """The pre-flight estimate (``estimate.estimate_optimizer_state``)."""

    by_group: list[int]


class GroupRow(TypedDict):
    index: int
    num_params: int
    bytes: int
    bytes_per_param: float
    lr: float | None  # the initial learning rate
    weight_decay: float | None


class TensorRow(TypedDict, total=False):
    name: str  # absent when the parameter's name is unknown
    shape: list[int]
    numel: int
    bytes: int
    bytes_per_param: float


class MeasuredInfo(StateSummary):
    step: int
    by_group: list[GroupRow]
    largest: list[TensorRow]


class Equivalents(TypedDict):
    """Same parameters, same block plan (hf_q4shampoo.memory); compression = equivalent / measured."""

    adamw_bytes: int
    fp32_shampoo_bytes: int
    compression_vs_adamw: float
    compression_vs_fp32_shampoo: float


class Alternative(TypedDict):
    """An ``estimate_memory`` row for this model (AdamW, 8-bit / 4-bit AdamW, fp32 Shampoo, Q4Shampoo forms)."""

    name: str
    label: str
    total_bytes: int
    bytes_per_param: float


class HistoryPoint(TypedDict):
    step: int
    state_bytes: int
    memory_bytes: int
    peak_memory_bytes: int


class ComparedRun(TypedDict):
    """Another run's report given in ``compare_with``."""

    label: str
    path: str
    total_bytes: int
    bytes_per_param: float
    peak_memory_bytes: int
    memory_kind: str
    history: list[HistoryPoint]


class MemoryReportJSON(TypedDict):
    """The whole ``memory_report.json``."""

    schema: str  # SCHEMA
    created: str  # ISO-8601 time (UTC)
    run: RunInfo
    model: ModelInfo | None
    optimizer: OptimizerInfo
    device: DeviceInfo
    estimate: EstimateInfo | None
    estimate_error: str | None  # why there is no estimate
    measured: MeasuredInfo
    estimate_relative_error: float | None  # measured / estimate - 1
    equivalents: Equivalents
    alternatives: list[Alternative]
    peak_memory_bytes: int  # peak of device.memory_kind over the run
    history: list[HistoryPoint]  # at most max_history entries (the sampling stride doubles when full)
    compared: list[ComparedRun]


def optimizer_label(opt: Any) -> str:
    """The optimizer as a person reads it, e.g. ``Q4Shampoo (cholesky_ef)``."""
    if isinstance(opt, Q4Shampoo):
        c = opt.config
        bits = "" if c.first_order_bits == 4 else f", {c.first_order_bits}-bit {c.first_order}"
        return f"Q4Shampoo ({c.precond}{bits})"
    if isinstance(opt, Q4AdamW):
        return f"Q4AdamW ({opt.config.variant}, m {opt.config.m_map})"
    if isinstance(opt, SparseMFAC):
        c = opt.config
        if c.variant == "lowrank":
            kept = f"rank {c.rank}"
        else:
            kept = f"k={c.k}" if c.k is not None else f"k={c.k_fraction:g}d"
        return f"SparseMFAC ({c.variant}, m={c.m}, {kept})"
    return type(opt).__name__


def state_summary(r: MemoryReport) -> StateSummary:
    return {
        "total_bytes": r.total,
        "bytes_per_param": r.bytes_per_param,
        "num_params": r.num_params,
        "num_tensors": r.num_tensors,
        "by_kind": dict(r.by_kind),
    }


def _group_rows(optimizer: Any, r: MemoryReport) -> list[GroupRow]:
    rows: list[GroupRow] = []
    for i, (group, nbytes, nparams) in enumerate(zip(optimizer.param_groups, r.by_group, r.group_num_params)):
        lr = group.get("initial_lr", group.get("lr"))  # schedulers keep the configured value here
        rows.append(
            {
                "index": i,
                "num_params": nparams,
                "bytes": nbytes,
                "bytes_per_param": nbytes / nparams if nparams else 0.0,
                "lr": float(lr) if lr is not None else None,
                "weight_decay": group.get("weight_decay"),
            }
        )
    return rows


def build_report(
    optimizer: Any,
    measured: MemoryReport,
    *,
    step: int,
    probe: MemoryProbe,
    run: RunInfo,
    model: ModelInfo | None = None,
    estimate: MemoryReport | None = None,
    estimate_error: str | None = None,
    alternatives: Sequence[Alternative] = (),
    history: Sequence[HistoryPoint] = (),
    compare_with: Sequence[str | os.PathLike] = (),
) -> MemoryReportJSON:
    """The ``memory_report.json`` content for ``optimizer``, whose state ``measured`` was taken at ``step``."""
    total = max(1, measured.total)
    config = optimizer.config.to_dict() if isinstance(optimizer, (Q4Shampoo, Q4AdamW, SparseMFAC)) else None
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": run,
        "model": model,
        "optimizer": {
            "class": type(optimizer).__name__,
            "label": optimizer_label(optimizer),
            "config": _jsonable(config),
            "num_groups": len(optimizer.param_groups),
        },
        "device": {
            "type": probe.device.type,
            "memory_kind": probe.kind,
            "peak_since": probe.peak_since,
            "log_key": probe.log_key,
        },
        "estimate": None if estimate is None else {**state_summary(estimate), "by_group": list(estimate.by_group)},
        "estimate_error": estimate_error,
        "measured": {
            "step": step,
            **state_summary(measured),
            "by_group": _group_rows(optimizer, measured),
            "largest": measured.largest,
        },
        "estimate_relative_error": measured.total / estimate.total - 1.0 if estimate and estimate.total else None,
        "equivalents": {
            "adamw_bytes": measured.adamw_equivalent,
            "fp32_shampoo_bytes": measured.fp32_shampoo_equivalent,
            "compression_vs_adamw": measured.adamw_equivalent / total,
            "compression_vs_fp32_shampoo": measured.fp32_shampoo_equivalent / total,
        },
        "alternatives": list(alternatives),
        "peak_memory_bytes": probe.peak(),
        "history": list(history),
        "compared": [compared_entry(Path(p)) for p in compare_with],
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def compared_entry(path: Path) -> ComparedRun:
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


def load_report(path: str | os.PathLike) -> MemoryReportJSON:
    """Read a ``memory_report.json`` (a file or the folder holding it), checking its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILES["json"]
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} report (schema: {report.get('schema')!r}).")
    return report
