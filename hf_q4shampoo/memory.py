"""Byte accounting of optimizer state, and equivalents for AdamW and fp32 Shampoo.

Memory kinds (``MemoryReport.by_kind``):

``statistics``        stored preconditioner statistics: 4-bit Cholesky factor / eigenvectors /
                      statistics codes (fp32 matrices for the ``fp32`` form and small factors)
``roots``             stored inverse roots (4-bit codes, or fp32)
``error_feedback``    the error-feedback state of ``cholesky_ef`` (half of the shared code buffer)
``first_order``       first-order moments (4-bit codes or fp32 tensors)
``scales_diagonals``  fp32 block scales, exact diagonals, eigenvalues, ridges, rank-1 maxima
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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .blocking import BlockPlan, plan_blocks
from .config import Q4ShampooConfig
from .first_order import first_order_keys
from .optimizer import _local
from .preconditioners import tensor_bytes
from .sparse_mfac import STATE_KINDS, SparseMFAC

__all__ = [
    "MemoryReport",
    "KINDS",
    "optimizer_state_bytes",
    "param_state_bytes",
    "unwrap_optimizer",
    "format_bytes",
]

KINDS = ("statistics", "roots", "error_feedback", "first_order", "scales_diagonals", "other", "indices", "gram")


@dataclass
class MemoryReport:
    """Optimizer-state bytes of one optimizer (see module docstring for the kinds)."""

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        d["bytes_per_param"] = self.bytes_per_param
        return d


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


#: Block plan of the fp32-Shampoo equivalent for optimizers other than Q4Shampoo.
_DEFAULT_CONFIG = Q4ShampooConfig()


def _factor_numel(plan: BlockPlan | None) -> int:
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


def _config_factor_numel(shape: torch.Size | tuple[int, ...], config: Q4ShampooConfig) -> int:
    """Entries of every Kronecker factor a Q4Shampoo with ``config`` keeps for a parameter of ``shape``."""
    c = config
    return _factor_numel(plan_blocks(tuple(shape), c.max_precond_dim, c.max_aspect_ratio, c.min_precond_numel))


def _plan_factor_numel(optimizer: Any, shape: torch.Size) -> int:
    if hasattr(optimizer, "block_plan"):
        return _factor_numel(optimizer.block_plan(shape))
    return _config_factor_numel(shape, _DEFAULT_CONFIG)


def param_state_bytes(optimizer: Any, p: torch.Tensor, seen: set[int] | None = None) -> dict[str, int]:
    """Bytes of the state ``optimizer`` holds for parameter ``p``, split into :data:`KINDS`.

    ``seen`` (ids of tensors already counted) lets a caller count a tensor shared between parameters
    once: bitsandbytes puts the same quantization-map tensor in every parameter's state.
    """
    optimizer = unwrap_optimizer(optimizer)
    kinds = dict.fromkeys(KINDS, 0)
    state = optimizer.state.get(p)
    if not state:
        return kinds
    if _is_sparse_mfac(optimizer):  # p is its group's first parameter: the whole group's state
        return _sparse_mfac_kinds(state)
    if not hasattr(optimizer, "_form"):
        for t in _nested_tensors(state):
            if seen is not None:
                if id(t) in seen:
                    continue
                seen.add(id(t))
            kinds["first_order"] += tensor_bytes(t)
        return kinds
    form = optimizer._form(torch.device("cpu"))
    numel = _local(p).numel()
    for key in first_order_keys(state):
        t = state[key]
        kind = "first_order" if key.endswith("_codes") or t.numel() == numel else "scales_diagonals"
        kinds[kind] += tensor_bytes(t)
    kinds["other"] += tensor_bytes(state["step"])
    if "skipped_updates" in state:  # the non-finite guard's counter (optimizer.py)
        kinds["other"] += tensor_bytes(state["skipped_updates"])
    for sides in state.get("regions", []):
        for side in sides.values():
            for kind, b in form.bytes_by_kind(side).items():
                kinds[kind] += b
    return kinds


def _is_sparse_mfac(optimizer: Any) -> bool:
    return isinstance(optimizer, SparseMFAC)


def _sparse_mfac_kinds(state: dict[str, Any]) -> dict[str, int]:
    kinds = dict.fromkeys(KINDS, 0)
    for key, value in state.items():
        for t in _nested_tensors(value):
            kinds[STATE_KINDS.get(key, "other")] += tensor_bytes(t)
    return kinds


def _sparse_mfac_report(optimizer: Any, largest: int) -> MemoryReport:
    """One report row per parameter group: SparseMFAC's state is per (flattened) group."""
    by_kind = dict.fromkeys(KINDS, 0)
    by_group, group_num_params, rows = [], [], []
    num_params = num_tensors = adamw = fp32_shampoo = 0
    for gi, group in enumerate(optimizer.param_groups):
        state = optimizer.group_state(gi)
        numel = sum(p.numel() for p in group["params"]) if state else 0
        kinds = _sparse_mfac_kinds(state) if state else dict.fromkeys(KINDS, 0)
        for kind, b in kinds.items():
            by_kind[kind] += b
        total = sum(kinds.values())
        by_group.append(total)
        group_num_params.append(numel)
        if state:
            count = len(group["params"])
            num_params += numel
            num_tensors += count
            adamw += 8 * numel
            fp32_shampoo += sum(8 * p.numel() + 8 * _plan_factor_numel(optimizer, p.shape) for p in group["params"])
            rows.append({"name": f"group {gi} ({count} tensors, flattened)", "shape": [numel], "numel": numel,
                         "bytes": total, "bytes_per_param": total / max(1, numel)})
    rows.sort(key=lambda r: -r["bytes"])
    return MemoryReport(by_kind=by_kind, num_params=num_params, num_tensors=num_tensors, adamw_equivalent=adamw,
                        fp32_shampoo_equivalent=fp32_shampoo, by_group=by_group, largest=rows[:largest],
                        group_num_params=group_num_params)


def optimizer_state_bytes(
    optimizer: Any, largest: int = 10, param_names: dict[int, str] | None = None
) -> MemoryReport:
    """Measure the state of ``optimizer`` (a Q4Shampoo, a SparseMFAC, or any torch optimizer) right now.

    A SparseMFAC is reported per parameter group (module docstring). For any other optimizer every
    state tensor counts as ``first_order``; a tensor-subclass
    state (torchao's ``OptimState4bit``, a DTensor) counts the inner tensors that hold its memory, and a
    tensor shared by several parameters' states is counted once.

    ``param_names`` maps ``id(parameter)`` to a name (e.g. from ``model.named_parameters()``); the
    ``largest`` rows then carry a ``name``.
    """
    optimizer = unwrap_optimizer(optimizer)
    if _is_sparse_mfac(optimizer):
        return _sparse_mfac_report(optimizer, largest)
    by_kind = dict.fromkeys(KINDS, 0)
    by_group: list[int] = []
    group_num_params: list[int] = []
    per_tensor = []
    num_params = num_tensors = 0
    adamw = fp32_shampoo = 0
    seen: set[int] = set()
    for group in optimizer.param_groups:
        group_bytes = group_params = 0
        for p in group["params"]:
            if not optimizer.state.get(p):
                continue
            local = _local(p)
            numel = local.numel()
            num_params += numel
            group_params += numel
            num_tensors += 1
            adamw += 8 * numel
            fp32_shampoo += 8 * numel + 8 * _plan_factor_numel(optimizer, local.shape)
            kinds = param_state_bytes(optimizer, p, seen)
            for kind, b in kinds.items():
                by_kind[kind] += b
            total = sum(kinds.values())
            group_bytes += total
            row = {"shape": list(p.shape), "numel": numel, "bytes": total, "bytes_per_param": total / max(1, numel)}
            if param_names is not None and id(p) in param_names:
                row = {"name": param_names[id(p)], **row}
            per_tensor.append(row)
        by_group.append(group_bytes)
        group_num_params.append(group_params)
    per_tensor.sort(key=lambda r: -r["bytes"])
    return MemoryReport(
        by_kind=by_kind,
        num_params=num_params,
        num_tensors=num_tensors,
        adamw_equivalent=adamw,
        fp32_shampoo_equivalent=fp32_shampoo,
        by_group=by_group,
        largest=per_tensor[:largest],
        group_num_params=group_num_params,
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover

