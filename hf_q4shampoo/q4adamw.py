"""``Q4AdamW``: paper 3's 4-bit AdamW and 4-bit Factor as an optimizer of its own (papers.md §4).

One step, for every parameter with gradient g (torch's AdamW, moments stored in 4 bit)::

    p <- (1 - lr wd) p                                        (decoupled decay)
    m <- b1 m + (1 - b1) g        stored: block-128 codes (dynamic exponent, or Linear-2), fp32 absmax
    v <- b2 v + (1 - b2) g^2      stored: rank-1 normalised zero-free linear codes ("4bit"),
                                  or fp32 row / column means of g^2 for matrices ("factor")
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Tensors of at most ``min_quant_numel`` entries keep fp32 moments (paper 3 App. D.1), and so do thin ones
(``min_quant_dim``: a side of at most 16 entries, e.g. LoRA's adapter factors).

All the arithmetic is :func:`hf_q4shampoo.first_order.adamw_batch_step`, the first-order step Q4Shampoo
runs after preconditioning (its Triton kernels on CUDA, compiled torch elsewhere on accelerators, torch's
fused AdamW for the fp32 moments of fp32 tensors, eager torch on CPU): this module only groups parameters
and keeps their state. Parameters of one parameter group with the same shape, dtype and device form a
*shape group* (``layout.build_layout``) whose moments live stacked in one buffer per key, so a step is a
handful of batched calls per shape group, whatever the number of tensors; ``state_dict`` holds views of
those buffers.

No host syncs: the step counters are CPU tensors, and the non-finite guard's per-member flags stay on the
device. A parameter whose gradient has a NaN/inf entry keeps its value and moments exactly (its step
counter advances) and counts the skip in ``state[p]["skipped_updates"]`` (:meth:`Q4AdamW.skipped_updates`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .blocking import local_tensor as _local
from .checkpoint import detach_views, restore_state, state_mismatch, upgrade_moment_scales
from .first_order import adamw_batch_step, total_skipped
from .graphed_update import GRAPH_ATTRIBUTES, GraphedUpdateMixin, flag_finite
from .layout import (
    IndexCache,
    Layout,
    MemberRows,
    StepBatch,
    build_layout,
    check_dense_real,
    layout_members,
    stacked_fp32,
    step_batches,
    step_gradients,
)
from .moments import first_order_keys, init_first_order_state, moment_bytes_by_kind
from .options import ConfigError, lr_number
from .q4adamw_config import (
    Q4ADAMW_GROUP_KEYS,
    Q4ADAMW_LAYOUT_KEYS,
    Q4ADAMW_LEGACY_LAYOUT,
    Q4AdamWConfig,
    parse_q4adamw_optim_args,
)

__all__ = ["Q4AdamW", "Q4AdamWConfig", "parse_q4adamw_optim_args", "Q4ADAMW_GROUP_KEYS", "Q4ADAMW_LAYOUT_KEYS"]

#: Where a state dict records the config that saved it (and what :meth:`Q4AdamW.load_state_dict` looks for).
CONFIG_KEY = "q4adamw_config"


class Q4AdamW(GraphedUpdateMixin, torch.optim.Optimizer):
    """AdamW with 4-bit moments (paper 3's "4-bit AdamW", or its "4-bit Factor" with ``variant="factor"``).

    Args:
        params: parameters or parameter groups (dicts may set ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``maximize``); a group setting a storage option (``variant``, ``m_map``, ...) is refused.
        lr, betas, eps, weight_decay: as torch's ``AdamW`` (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2); ``lr``
            may be a one-element tensor.
        config: a :class:`Q4AdamWConfig` (or a dict of its fields) to start from; keywords override it.
        **options: any other :class:`Q4AdamWConfig` field: ``variant``, ``m_map``, ``min_quant_numel``,
            ``maximize``, ``use_compile``, ``cuda_graph``.

    State is created at a parameter's first step (or :meth:`build_state`) on its device. Sparse and complex
    gradients are refused. DTensor (FSDP2) parameters keep the state of their local shard.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        *,
        config: Q4AdamWConfig | Mapping[str, Any] | None = None,
        **options: Any,
    ):
        given = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        overrides = {k: v for k, v in given.items() if v is not None} | options
        lr_tensor = overrides["lr"] if isinstance(overrides.get("lr"), torch.Tensor) else None
        if lr_tensor is not None:
            overrides["lr"] = lr_number(lr_tensor, "Q4AdamW")
        base = Q4AdamWConfig.from_kwargs(**config) if isinstance(config, Mapping) else (config or Q4AdamWConfig())
        self.config = base.replace(**overrides) if overrides else base
        defaults = self.config.group_defaults()
        if lr_tensor is not None:
            defaults["lr"] = lr_tensor
        super().__init__(params, defaults)  # validates every group (add_param_group)
        self._layout_version = 0

    # ------------------------------------------------------------------------------------------
    # torch protocol: copies, groups, counters
    # ------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """torch's three entries plus the config (``copy.deepcopy``, ``pickle``); the layout is rebuilt."""
        state = super().__getstate__()
        state["config"] = self.config
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for cached in ("_layout", "_index_cache", *GRAPH_ATTRIBUTES):
            self.__dict__.pop(cached, None)
        self.__dict__.setdefault("_layout_version", 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, with the constructor's validation (nothing is added when it fails)."""
        if isinstance(param_group, dict):
            wide = sorted(k for k in param_group if k in Q4AdamWConfig.field_names() and k not in Q4ADAMW_GROUP_KEYS)
            if wide:
                raise ConfigError(
                    f"Q4AdamW: {', '.join(map(repr, wide))} cannot be set per parameter group: it holds for the "
                    f"whole optimizer. Per-group options: {', '.join(Q4ADAMW_GROUP_KEYS)}."
                )
            checked = {k: param_group[k] for k in Q4ADAMW_GROUP_KEYS if k in param_group}
            if isinstance(checked.get("lr"), torch.Tensor):
                checked["lr"] = lr_number(checked["lr"], "Q4AdamW")
            if isinstance(checked.get("betas"), list):
                checked["betas"] = param_group["betas"] = tuple(checked["betas"])
            self.config.replace(**checked)
        super().add_param_group(param_group)

    def skipped_updates(self) -> int:
        """Total number of parameter updates skipped for a NaN/inf gradient so far (waits for the device)."""
        return total_skipped(self.state.values())

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        local = _local(p)
        c = self.config
        state["step"] = torch.tensor(0.0)  # CPU: reading it never waits for the device
        state["skipped_updates"] = torch.zeros((), dtype=torch.int64, device=local.device)
        state.update(
            init_first_order_state(local, "adamw", 4, c.min_quant_numel, c.first_order_v, c.m_map, c.min_quant_dim)
        )

    def build_state(self) -> None:
        """Create every parameter's state now instead of at its first step (works on ``meta`` parameters,
        which is how the pre-flight estimate sizes it)."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, self.state[p])

    def state_bytes(self, p: torch.Tensor) -> dict[str, int]:
        """Bytes of ``p``'s state by memory kind (``hf_q4shampoo.memory.KINDS``): ``first_order`` (codes, fp32
        moments, factored row / column means), ``scales_diagonals`` (block scales, rank-1 maxima) and ``other``
        (step and skip counters). Empty before ``p``'s first step."""
        state = self.state.get(p)
        if not state:
            return {}
        out = moment_bytes_by_kind(state, _local(p).numel())
        out["other"] = sum(t.numel() * t.element_size() for t in (state["step"], state["skipped_updates"]))
        return out

    def _current_layout(self) -> Layout:
        """Shape groups of every parameter with state, moments stacked (rebuilt when that set changes)."""
        members = layout_members(self.param_groups, self.state)
        key = (self._layout_version, tuple(id(s) for _, _, s in members))
        layout = self.__dict__.get("_layout")
        if layout is None or layout.key != key:
            layout = self._layout = build_layout(members, lambda shape: None, first_order_keys, key)
        return layout

    def _index(self, rows: list[int], device: torch.device) -> torch.Tensor:
        cache = self.__dict__.get("_index_cache")
        if cache is None:
            cache = self._index_cache = IndexCache()
        return cache(rows, device)

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._graph_trial_step()  # cuda_graph="auto": is the graphed update faster here? (graphed_update.py)
        grads, steps = step_gradients(self.param_groups, self.state, self._init_state, _check_q4adamw_param)
        if not grads:
            return loss
        layout = self._current_layout()
        self._run_update(layout, step_batches(layout, grads, steps))
        return loss

    # ---- the graphed update's hooks (graphed_update.py) ----------------------------------------
    GRAPH_OWNER = "Q4AdamW"

    def _graph_config_ok(self) -> bool:
        """The Triton and fused AdamW kernels read the lr and bias corrections from device scalars; the eager torch
        math (``use_compile=False``) does not.

        Under several processes every rank updates every parameter, and each rank's trial decides alone, so the
        graphed step must equal the eager one bit for bit. It does for ``variant="4bit"`` (the graph's chunks split
        members; per member the step is elementwise, and its v maxima are exact). Not for ``"factor"``: its row and
        column sums are reductions whose order can change with the batch size, so a chunked group can differ in the
        last bits: eager there."""
        if not self.config.use_compile:
            return False
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return not (several and self.config.variant == "factor")

    def _step_batch(self, batch: StepBatch, g: torch.Tensor | None = None) -> None:
        """One batched AdamW step of ``batch`` (members of one shape group sharing a step count). ``g``: their
        gradients already stacked in fp32 (the graphed update gathers them by address); ``batch.finite``: their
        finite flags when the caller made them."""
        shape_group = batch.group
        group = self.param_groups[shape_group.group_index]
        if batch.finite is None:
            flag_finite([batch])
        keep = batch.finite
        directions = stacked_fp32(batch.grads) if g is None else g
        if group["maximize"]:
            directions = directions.neg()  # not in place: for one fp32 gradient it is p.grad itself
        params = [shape_group.params[m] for m in batch.members]
        # a run of members (always, inside the graph) as views of the stacked state, updated in place
        rows = MemberRows(batch.members, self._index, directions.device)
        moments = rows.take(shape_group.moments)
        adamw_batch_step(
            params,
            directions,
            moments,
            step=batch.step,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bits=4,
            compile_=self.config.use_compile,
            m_map=self.config.m_map,
            keep=keep,
        )
        rows.write_back(shape_group.moments, moments)
        rows.count_skips(shape_group.skipped, keep)

    # ------------------------------------------------------------------------------------------
    # state dict
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (plain tensors, loads with ``torch.load(weights_only=True)``) plus the config."""
        sd = super().state_dict()
        # the per-parameter tensors are views of the stacked buffers: save them as tensors of their own (a view
        # would serialise its whole buffer under some checkpoint writers)
        sd["state"] = {i: detach_views(s) for i, s in sd["state"].items()}
        sd[CONFIG_KEY] = self.config.to_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every tensor's saved dtype (uint8 codes stay uint8; torch's base class
        would cast them to the parameter's dtype).

        Refused before anything changes (:class:`~hf_q4shampoo.ConfigError`): a state dict Q4AdamW did not
        save (torch's AdamW, Q4Shampoo, ...: their moments are stored differently, and a silent conversion
        would hide a resume from the wrong checkpoint); one saved with other storage options
        (``variant``, ``m_map``, ``min_quant_numel``, ``min_quant_dim``; a checkpoint from before
        ``min_quant_dim`` existed counts as 0); one whose state does not fit a parameter's shape.
        """
        saved_cfg = state_dict.get(CONFIG_KEY) if isinstance(state_dict, Mapping) else None
        if not isinstance(saved_cfg, Mapping):
            raise ConfigError(_foreign_state_message(state_dict))
        saved = {k: saved_cfg.get(k, Q4ADAMW_LEGACY_LAYOUT.get(k)) for k in Q4ADAMW_LAYOUT_KEYS}
        diffs = [k for k in Q4ADAMW_LAYOUT_KEYS if saved[k] != getattr(self.config, k)]
        if diffs:
            detail = ", ".join(f"{k}: saved {saved[k]!r}, now {getattr(self.config, k)!r}" for k in diffs)
            raise ConfigError(
                f"Q4AdamW: the checkpoint's optimizer state was made with other storage options ({detail}); "
                "construct the optimizer with the saved values to resume."
            )
        saved_state = state_dict["state"]
        self._check_saved_shapes(state_dict)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != CONFIG_KEY})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if index in saved_state:
                device = _local(p).device
                self.state[p] = restore_state(saved_state[index], device)
                upgrade_moment_scales(self.state[p])
        self._layout_version += 1
        self.__dict__.pop("_layout", None)

    def _check_saved_shapes(self, state_dict: Mapping[str, Any]) -> None:
        """Compare each saved state with the one this optimizer would create for its parameter (on ``meta``)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return  # torch's own check names the group-size mismatch
        for gi, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups)):
            for position, (saved_id, p) in enumerate(zip(saved_group["params"], group["params"])):
                saved = state_dict["state"].get(saved_id)
                if saved is None:
                    continue
                saved = restore_state(saved, torch.device("meta"))  # a copy: the caller's state dict stays as it is
                upgrade_moment_scales(saved)  # older checkpoints' bf16 block scales, in shape only
                local = _local(p)
                expected: dict[str, Any] = {}
                self._init_state(torch.empty(local.shape, dtype=local.dtype, device="meta"), expected)
                problem = state_mismatch(saved, expected, "")
                if problem:
                    raise ConfigError(
                        f"Q4AdamW: the saved state of parameter #{position} of group {gi} (shape "
                        f"{tuple(local.shape)}) does not fit it: {problem}. Load the checkpoint into an optimizer "
                        "over the same parameters, in the same order."
                    )


def _foreign_state_message(state_dict: Any) -> str:
    """Why a state dict without Q4AdamW's config is refused, and what to do instead."""
    sd = state_dict if isinstance(state_dict, Mapping) else {}
    state = sd.get("state", {}) if isinstance(sd.get("state"), Mapping) else {}
    keys = sorted({str(k) for v in state.values() if isinstance(v, Mapping) for k in v})
    seen = f" (its per-parameter state has {', '.join(keys)})" if keys else ""
    other = " It was saved by Q4Shampoo." if "q4shampoo_config" in sd else ""
    return (
        f"Q4AdamW: this optimizer state dict was not saved by Q4AdamW{seen}.{other} Q4AdamW cannot continue another "
        "optimizer's state (its moments are stored differently). To switch optimizers mid-run, start Q4AdamW's "
        "state fresh (with the Trainer: remove optimizer.pt from the checkpoint folder before resuming; the "
        "learning-rate schedule then restarts too), or resume with the optimizer that saved it."
    )


def _check_q4adamw_param(p: torch.Tensor) -> None:
    check_dense_real(p, "Q4AdamW")
