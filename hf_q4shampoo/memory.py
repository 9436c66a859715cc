"""Byte accounting of optimizer state, and equivalents for AdamW and fp32 Shampoo.

Memory kinds (``MemoryReport.by_kind``):

``statistics``        stored preconditioner statistics: 4-bit Cholesky factor / eigenvectors /
                      statistics codes (fp32 matrices for the ``fp32`` form and small factors)
``roots``             stored inverse roots (4-bit codes, or fp32)
``error_feedback``    the error-feedback state of ``cholesky_ef`` (half of the shared code buffer)
``first_order``       first-order moments (4-bit codes or fp32 tensors)
``scales_diagonals``  block scales (one byte, or bf16) and their exponents, diagonals, eigenvalues, ridges,
                      rank-1 maxima
``other``             step counters
``indices``           integer positions of sparse stored entries (SparseMFAC's top-k window)
``gram``              m x m inner-product matrices (SparseMFAC's ``D = G G^T``, fp64)

:class:`~hf_q4shampoo.sparse_mfac.SparseMFAC` keeps one state per parameter group (in the state of the
group's first parameter); its tensors map to kinds by ``sparse_mfac.STATE_KINDS``: the window's values
(or low-rank factors and exactly stored vectors) are ``statistics`` (M-FAC's statistics *are* the window
of past gradients), its positions ``indices``, the error-feedback accumulator ``error_feedback``, ``D``
``gram``, the momentum buffer ``first_order`` and the step counter ``other``. Its report has one
``largest`` row per group (``name`` ``"group i (n tensors, flattened)"``).

Equivalents are computed for the *same parameters and the same block plan*: ``adamw`` = 8 bytes per
parameter (fp32 m and v), ``fp32_shampoo`` = fp32 statistics and roots for every factor
(``8 n^2`` bytes per factor) + fp32 Adam moments (8 bytes per parameter). The block plan is the
optimizer's own for a Q4Shampoo, and that of the default :class:`~hf_q4shampoo.Q4ShampooConfig` for
any other optimizer (so an AdamW run compares with the Shampoo a Q4Shampoo run would have stored).
:func:`adamw_equivalent` and :func:`fp32_shampoo_equivalent` are the one place these are defined.

Where the bytes come from: an optimizer that has a public ``state_bytes(param) -> {kind: bytes}``
(:meth:`Q4Shampoo.state_bytes <hf_q4shampoo.Q4Shampoo.state_bytes>`) reports its own state; a SparseMFAC
reports per group (above); any other optimizer's state tensors all count as ``first_order``.
:class:`ReportBuilder` assembles a :class:`MemoryReport` from such per-tensor bytes; both the measured
report (:func:`optimizer_state_bytes`) and the pre-flight estimate (``estimate.py``) use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocking import BlockPlan, local_tensor, plan_blocks
from .config import Q4ShampooConfig
from .preconditioners import tensor_bytes
from .sparse_mfac import STATE_KINDS, SparseMFAC

__all__ = [
    "MemoryReport",
    "ReportBuilder",
    "KINDS",
    "optimizer_state_bytes",
    "param_state_bytes",
    "unwrap_optimizer",
    "format_bytes",
    "adamw_equivalent",
    "fp32_shampoo_equivalent",
    "config_block_plan",
    "factor_numel",
]

KINDS = ("statistics", "roots", "error_feedback", "first_order", "scales_diagonals", "other", "indices", "gram")

#: ``shape -> BlockPlan | None``: how a parameter of that shape is cut into blocks (``Q4Shampoo.block_plan``).
PlanFn = Callable[[tuple[int, ...]], BlockPlan | None]


@dataclass
class MemoryReport:
    """Optimizer-state bytes of one optimizer (see module docstring for the kinds).

    Its JSON form is ``integrations.report.state_summary`` (the ``estimate`` / ``measured`` entries of
    ``memory_report.json``).
    """

    by_kind: dict[str, int]
    num_params: int  # parameters (entries) that have optimizer state
    num_tensors: int
    adamw_equivalent: int
    fp32_shampoo_equivalent: int
    by_group: list[int] = field(default_factory=list)
    largest: list[dict[str, Any]] = field(default_factory=list)  # biggest per-tensor states
    group_num_params: list[int] = field(default_factory=list)  # entries with state, per group

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    @property
    def bytes_per_param(self) -> float:
        return self.total / max(1, self.num_params)


# ----------------------------------------------------------------------------------------------
# equivalents: the one definition
# ----------------------------------------------------------------------------------------------


def factor_numel(plan: BlockPlan | None) -> int:
    """Entries of every Kronecker factor (statistic or root) of ``plan``."""
    if plan is None:
        return 0
    total = 0
    for r in plan.regions:
        if r.precond_rows:
            total += r.num_blocks * r.block_rows**2
        if r.precond_cols:
            total += r.num_blocks * r.block_cols**2
    return total


def config_block_plan(config: Q4ShampooConfig | None = None) -> PlanFn:
    """The block plan of a Q4Shampoo with ``config`` (default: the default config), as a function of the shape."""
    c = config or Q4ShampooConfig()
    return lambda shape: plan_blocks(
        tuple(shape), c.max_precond_dim, c.max_aspect_ratio, c.min_precond_numel, c.block_split
    )


def adamw_equivalent(shape: Iterable[int]) -> int:
    """Bytes of AdamW's fp32 m and v for a parameter of ``shape``."""
    return 8 * math.prod(shape)


def fp32_shampoo_equivalent(shape: Iterable[int], plan: PlanFn) -> int:
    """Bytes of fp32 Shampoo for a parameter of ``shape``: fp32 statistic and root of every factor of ``plan``
    (``8 k^2`` per factor of order ``k``) + fp32 Adam m and v."""
    shape = tuple(shape)
    return 8 * math.prod(shape) + 8 * factor_numel(plan(shape))


# ----------------------------------------------------------------------------------------------
# the report builder: the one assembly of a MemoryReport
# ----------------------------------------------------------------------------------------------


class ReportBuilder:
    """Accumulates per-tensor state bytes into a :class:`MemoryReport`, group by group.

    ``plan`` gives the block plan of the fp32-Shampoo equivalent. Call :meth:`group` before each parameter
    group's tensors, :meth:`add` per tensor (or per ``count`` tensors of one shape), :meth:`row` for a line
    of the "largest" table, then :meth:`report`.
    """

    def __init__(self, plan: PlanFn):
        self.plan = plan
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.by_group: list[int] = []
        self.group_num_params: list[int] = []
        self.rows: list[dict[str, Any]] = []
        self.num_params = self.num_tensors = self.adamw = self.fp32_shampoo = 0

    def group(self) -> None:
        self.by_group.append(0)
        self.group_num_params.append(0)

    def add(self, shape: Iterable[int], kinds: dict[str, int], count: int = 1) -> int:
        """Count ``count`` tensors of ``shape`` whose state each takes ``kinds`` bytes; returns one's total."""
        shape = tuple(shape)
        numel = math.prod(shape)
        total = 0
        for kind, b in kinds.items():
            self.by_kind[kind] += b * count
            total += b
        self.by_group[-1] += total * count
        self.group_num_params[-1] += numel * count
        self.num_params += numel * count
        self.num_tensors += count
        self.adamw += adamw_equivalent(shape) * count
        self.fp32_shampoo += fp32_shampoo_equivalent(shape, self.plan) * count
        return total

    def row(self, name: str | None, shape: Iterable[int], numel: int, nbytes: int) -> None:
        row = {"shape": list(shape), "numel": numel, "bytes": nbytes, "bytes_per_param": nbytes / max(1, numel)}
        self.rows.append(row if name is None else {"name": name, **row})

    def report(self, largest: int = 10) -> MemoryReport:
        rows = sorted(self.rows, key=lambda r: -r["bytes"])[:largest]
        return MemoryReport(
            by_kind=self.by_kind,
            num_params=self.num_params,
            num_tensors=self.num_tensors,
            adamw_equivalent=self.adamw,
            fp32_shampoo_equivalent=self.fp32_shampoo,
            by_group=self.by_group,
            largest=rows,
            group_num_params=self.group_num_params,
        )


# ----------------------------------------------------------------------------------------------
# measuring an optimizer
# ----------------------------------------------------------------------------------------------


def unwrap_optimizer(opt: Any) -> Any:
    """Follow ``.optimizer`` (accelerate / DeepSpeed wrappers) down to the real optimizer."""
    seen = set()
    while hasattr(opt, "optimizer") and id(opt) not in seen and not hasattr(opt, "block_plan"):
        seen.add(id(opt))
        opt = opt.optimizer
    return opt


def _leaf_tensors(t: torch.Tensor):
    """The tensors that own memory behind ``t``.

    A wrapper subclass (torchao's ``OptimState4bit``, a DTensor) reports its *logical* shape and dtype,
    so ``numel * element_size`` would count a 4-bit state as fp32 and a DTensor shard as the full
    tensor; its inner tensors (``__tensor_flatten__``) are what is allocated.
    """
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(t, name))
    else:
        yield t


def _nested_tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield from _leaf_tensors(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _nested_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _nested_tensors(v)


def _optimizer_plan(optimizer: Any) -> PlanFn:
    """The optimizer's own block plan (a Q4Shampoo), else the default config's."""
    plan = getattr(optimizer, "block_plan", None)
    return plan if callable(plan) else config_block_plan()


def param_state_bytes(optimizer: Any, p: torch.Tensor, seen: set[int] | None = None) -> dict[str, int]:
    """Bytes of the state ``optimizer`` holds for parameter ``p``, split into :data:`KINDS`.

    An optimizer with a ``state_bytes(p)`` method (Q4Shampoo) reports its own kinds; for a SparseMFAC, ``p``
    is its group's first parameter and the result the whole group's state; for any other optimizer every
    state tensor is ``first_order``. ``seen`` (ids of tensors already counted) lets a caller count a tensor
    shared between parameters once: bitsandbytes puts the same quantization-map tensor in every parameter's
    state.
    """
    optimizer = unwrap_optimizer(optimizer)
    kinds = dict.fromkeys(KINDS, 0)
    state = optimizer.state.get(p)
    if not state:
        return kinds
    if isinstance(optimizer, SparseMFAC):
        return _sparse_mfac_kinds(state)
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        kinds.update(own(p))
        return kinds
    for t in _nested_tensors(state):
        if seen is not None:
            if id(t) in seen:
                continue
            seen.add(id(t))
        kinds["first_order"] += tensor_bytes(t)
    return kinds


def _sparse_mfac_kinds(state: dict[str, Any]) -> dict[str, int]:
    kinds = dict.fromkeys(KINDS, 0)
    for key, value in state.items():
        for t in _nested_tensors(value):
            kinds[STATE_KINDS.get(key, "other")] += tensor_bytes(t)
    return kinds


def _sparse_mfac_report(optimizer: SparseMFAC, largest: int) -> MemoryReport:
    """One report row per parameter group: SparseMFAC's state is per (flattened) group."""
    builder = ReportBuilder(_optimizer_plan(optimizer))
    for gi, group in enumerate(optimizer.param_groups):
        builder.group()
        state = optimizer.group_state(gi)
        if not state:
            continue
        params = group["params"]
        total = sum(builder.add(p.shape, _sparse_mfac_kinds(state) if i == 0 else {}) for i, p in enumerate(params))
        numel = sum(p.numel() for p in params)
        builder.row(f"group {gi} ({len(params)} tensors, flattened)", [numel], numel, total)
    return builder.report(largest)


def optimizer_state_bytes(optimizer: Any, largest: int = 10, param_names: dict[int, str] | None = None) -> MemoryReport:
    """Measure the state of ``optimizer`` (a Q4Shampoo, a SparseMFAC, or any torch optimizer) right now.

    A SparseMFAC is reported per parameter group (module docstring). For any other optimizer every
    state tensor counts as ``first_order``; a tensor-subclass
    state (torchao's ``OptimState4bit``, a DTensor) counts the inner tensors that hold its memory, and a
    tensor shared by several parameters' states is counted once.

    ``param_names`` maps ``id(parameter)`` to a name (e.g. from ``model.named_parameters()``); the
    ``largest`` rows then carry a ``name``.
    """
    optimizer = unwrap_optimizer(optimizer)
    if isinstance(optimizer, SparseMFAC):
        return _sparse_mfac_report(optimizer, largest)
    builder = ReportBuilder(_optimizer_plan(optimizer))
    seen: set[int] = set()
    names = param_names or {}
    for group in optimizer.param_groups:
        builder.group()
        for p in group["params"]:
            if not optimizer.state.get(p):
                continue
            local = local_tensor(p)
            total = builder.add(local.shape, param_state_bytes(optimizer, p, seen))
            builder.row(names.get(id(p)), p.shape, local.numel(), total)
    return builder.report(largest)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
