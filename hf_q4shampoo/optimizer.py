"""``Q4Shampoo``: Shampoo with 4-bit preconditioners and 4-bit first-order states.

One step, for every matrix parameter W with gradient G (paper 2 Algorithm 4; papers.md §1.1)::

    if t % update_freq == 0:  L <- beta L + (1-beta) G G^T ;  R <- beta R + (1-beta) G^T G   (per block)
    if t % root_freq   == 0:  L^ <- (L + eps lmax I)^-1/4 ;  R^ <- (R + eps lmax I)^-1/4
    G^ = L^ G R^                                  (per block, merged back)
    grafting="norm" (default):
        G~ = G^ * ||G||_F / ||G^||_F              (per tensor)
        W  <- first_order_step(W, G~)             (AdamW or SGD-momentum on G~)
    grafting="adam" (Distributed Shampoo's Adam grafting; first_order.adam_graft_batch_step):
        v  <- beta2 v + (1-beta2) G^2 ;  A = G / (sqrt(v / (1-beta2^t)) + eps)     (Adam step of G)
        G~ = G^ * ||A||_F / ||G^||_F              (per block; G~ = A before the first root)
        m  <- beta1 m + (1-beta1) G~ ;  W <- (1 - lr wd) W - lr m / (1-beta1^t)
    grafting="adam_filtered" (Distributed Shampoo's order; first_order.adam_filtered_batch_step):
        m  <- beta1 m + (1-beta1) G ;  v <- beta2 v + (1-beta2) G^2 ;  M = m / (1-beta1^t)
        A  = M / (sqrt(v / (1-beta2^t)) + eps)   (the AdamW step) ;  M^ = L^ M R^   (per block)
        G~ = M^ * ||A||_F / ||M^||_F              (per block; G~ = A before the first root)
        W  <- (1 - lr wd) W - lr G~

Parameters without a preconditioner (1-D, small) take the plain AdamW / SGD step in both modes.

A parameter whose gradient has a NaN or infinite entry skips that step entirely: its statistics, roots,
first-order moments and value stay as they were (only its step counter advances), and the skip is counted
in its state (``skipped_updates``; :meth:`Q4Shampoo.skipped_updates` sums them). The check costs one
max-abs reduction per gradient and never makes the host wait for the accelerator: the flags stay on the
device and select old or new values with ``torch.where``. One bad batch (an fp16 overflow, a corrupted
example) therefore loses one step of one parameter instead of turning the whole matrix into NaN for good.
The same holds for a member whose preconditioned direction is not finite (a bad root): it skips its
first-order step.

How L, R and the roots are *stored* is the job of a preconditioner form (``preconditioners.py``);
how a parameter is cut into blocks is ``blocking.py``. Blocks of the same order are concatenated
across all parameters so every stage is a handful of batched tensor ops.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from functools import lru_cache
from typing import Any

import torch

from . import linalg
from .blocking import BlockPlan, plan_blocks
from .blocking import local_tensor as _local
from .checkpoint import CheckpointMixin
from .config import GROUP_KEYS, ConfigError, Q4ShampooConfig
from .direction import DirectionMixin
from .distributed import (
    DdpSplit,
    keep_owned_work,
    split_for,
    strip_statistics,
)
from .first_order import total_skipped
from .graphed_update import GRAPH_ATTRIBUTES, GraphedUpdateMixin, flag_finite
from .layout import (
    IndexCache,
    Layout,
    StepBatch,
    build_layout,
    check_dense_real,
    layout_members,
    step_batches,
    step_gradients,
)
from .moments import first_order_keys, init_first_order_state, moment_bytes_by_kind
from .options import lr_number, plain_value
from .owner_balance import assign_owners, refresh_round_ms, step_share_cost
from .preconditioners import FormSettings, PreconditionerForm, make_form, tensor_bytes
from .refresh import RefreshMixin
from .schedule import first_root as _first_root
from .schedule import is_due as _is_due
from .schedule import refresh_cost, refresh_offsets, root_shift
from .schedule import root_due as _root_due
from .warmup import run_first_step_warm_ups

__all__ = ["Q4Shampoo"]

#: Attributes DeepSpeed ZeRO-3 sets on the parameters it partitions (ZeRO-1/2 hand the optimizer flat
#: partitions without markers: the Trainer integration refuses those setups from its arguments).
_DEEPSPEED_MARKERS = ("ds_id", "ds_numel", "ds_tensor", "ds_status")


def second_moment_mode(first_order_v: str, plan: BlockPlan | None) -> str:
    """How Adam's v of one parameter is stored: ``first_order_v`` itself, except ``"one_sided"``, which is
    ``"factored"`` for a matrix Shampoo preconditions on one side only (``plan.one_sided``) and ``"rank1"``
    otherwise."""
    if first_order_v != "one_sided":
        return first_order_v
    return "factored" if plan is not None and plan.one_sided else "rank1"


def _as_config(config: Any) -> Q4ShampooConfig:
    """``config=`` as given: a :class:`Q4ShampooConfig`, a dict of its fields, or None (the defaults)."""
    if config is None:
        return Q4ShampooConfig()
    if isinstance(config, Q4ShampooConfig):
        return config
    if isinstance(config, Mapping):
        return Q4ShampooConfig.from_kwargs(**config)
    raise ConfigError(
        f"Q4Shampoo: config must be a Q4ShampooConfig or a dict of its fields, got {type(config).__name__} "
        f'{config!r}. Options go in as keywords, e.g. Q4Shampoo(params, precond="eigen").'
    )


class Q4Shampoo(CheckpointMixin, RefreshMixin, DirectionMixin, GraphedUpdateMixin, torch.optim.Optimizer):
    """Shampoo with 4-bit preconditioners (a refined 4-bit Cholesky factor by default, paper 1's layout).

    Args:
        params: parameters or parameter groups (dicts may set ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``momentum``, ``nesterov``, ``maximize``: :data:`~hf_q4shampoo.config.GROUP_KEYS`).
            Empty groups are allowed. A group setting another Q4Shampoo option (``update_freq``, ``precond``,
            ...) is refused by name: those options hold for the whole optimizer.
        lr, betas, eps, weight_decay: first-order hyper-parameters (defaults 1e-3, (0.9, 0.999),
            1e-8, 0.0). ``lr`` may be a one-element tensor (e.g. driven by a scheduler); numpy scalars
            are accepted for every numeric option.
        config: a :class:`Q4ShampooConfig` or a dict of its fields; keyword options below override it.
        **options: any other :class:`Q4ShampooConfig` field, e.g. ``precond="eigen"``,
            ``update_freq=10``, ``root_freq=50``, ``first_order="sgd"``, ``momentum=0.9``.

    Matrices (after dropping size-1 dims and flattening trailing dims) are preconditioned; 1-D
    tensors and matrices under ``min_precond_numel`` take the first-order step alone. State is
    created lazily on the parameter's device at its first step. Gradients with NaN/inf entries skip
    their parameter's update (module docstring). The optimizer can be deep-copied and pickled.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        *,
        config: Q4ShampooConfig | None = None,
        **options: Any,
    ):
        given = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        overrides = {k: v for k, v in given.items() if v is not None}
        overrides.update(options)
        lr_tensor = overrides.get("lr") if isinstance(overrides.get("lr"), torch.Tensor) else None
        if lr_tensor is not None:
            overrides["lr"] = lr_number(lr_tensor)
        base = _as_config(config)
        cfg = base.replace(**overrides) if overrides else base
        self.config = cfg
        defaults = cfg.group_defaults()
        if lr_tensor is not None:
            defaults["lr"] = lr_tensor
        super().__init__(params, defaults)  # validates every group (add_param_group)
        self._init_runtime()
        self._warn_if_no_root()

    def _init_runtime(self) -> None:
        """Attributes derived from ``config`` that the step keeps (made anew for a copy or an unpickled
        optimizer, never shared with the original)."""
        self._forms: dict[tuple, PreconditionerForm] = {}
        self._layout_version = 0  # bumped when the state is replaced (load_state_dict): rebuilds the layout
        for name in (
            "_layout",
            "_index_cache",
            "_offset_key",
            "_offsets",
            "_split",
            "_owner_key",
            "_owner_by_id",
            "_consolidated",
            *GRAPH_ATTRIBUTES,
        ):
            self.__dict__.pop(name, None)
        #: Optional ``name -> context manager`` factory that profiling tools set to time the stages of a
        #: step ("statistics", "roots", "apply", "grafting", "first_order"); None costs nothing.
        self.stage_timer: Callable[[str], Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """torch's pickling protocol (``copy.deepcopy``, ``pickle``): torch's three entries plus the config.

        The layout, index and form caches are rebuilt by the copy (their tensors would otherwise be shared
        with, or duplicated beside, the state); ``stage_timer`` (a profiler's hook) is not carried over.
        """
        state = super().__getstate__()
        state["config"] = self.config
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "config" in state:  # a copy or an unpickled optimizer (load_state_dict passes only state/groups)
            self._init_runtime()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, with the constructor's validation (nothing is added when it fails)."""
        if isinstance(param_group, dict):
            self._validate_group(param_group)
        super().add_param_group(param_group)

    def skipped_updates(self) -> int:
        """Total number of parameter updates skipped for a NaN/inf gradient (or direction) so far.

        For logging: it reads the per-parameter counters (``state[p]["skipped_updates"]``), which waits for
        the accelerator once per device.
        """
        return total_skipped(self.state.values())

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the optimizer the run's length (optimizer steps), which the ``"auto"`` schedule reads.

        Call it before the first step (the Trainer integration does); later, the schedule of a running
        optimizer would change under it, so that raises.
        """
        if any(self.state.values()):
            raise RuntimeError("Q4Shampoo.set_total_steps must be called before the first step.")
        self.config = self.config.replace(total_steps=total_steps)
        self._warn_if_no_root()

    def _warn_if_no_root(self) -> None:
        total = self.config.total_steps
        update_freq, root_freq = self.config.schedule()
        first = _first_root(root_freq, self.config.start_precond_step, 0, self.config.first_root())
        if total is not None and first > total:
            warnings.warn(
                f"Q4Shampoo: root_freq={root_freq} but the run has {total} steps: no inverse root will be computed, "
                'so it trains as (4-bit) AdamW alone. Leave update_freq/root_freq at "auto" or lower them.',
                stacklevel=3,
            )

    def _stage(self, name: str):
        return nullcontext() if self.stage_timer is None else self.stage_timer(name)

    # ------------------------------------------------------------------------------------------
    # configuration helpers
    # ------------------------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a parameter group's options as the constructor checks its own (numpy scalars become
        Python numbers in the group). Other libraries put their own keys in groups (names, initial_lr,
        ...): only Q4Shampoo's are checked, and those that hold for the whole optimizer are refused."""
        wide = sorted(k for k in group if k in Q4ShampooConfig.field_names() and k not in GROUP_KEYS)
        if wide:
            raise ConfigError(
                f"Q4Shampoo: {', '.join(map(repr, wide))} cannot be set per parameter group: it holds for the "
                f"whole optimizer (pass it to Q4Shampoo(...)). Per-group options: {', '.join(GROUP_KEYS)}."
            )
        for key in GROUP_KEYS:
            if key in group and not isinstance(group[key], torch.Tensor):
                value = plain_value(group[key])
                if key == "betas" and isinstance(value, list | tuple):
                    value = tuple(plain_value(b) for b in value)
                group[key] = value
        checked = {k: group[k] for k in GROUP_KEYS if k in group}
        if isinstance(checked.get("lr"), torch.Tensor):
            checked["lr"] = lr_number(checked["lr"])
        self.config.replace(**checked)

    def _form(self, device: torch.device) -> PreconditionerForm:
        """The preconditioner form, reading this optimizer's config with the choices of ``device`` resolved."""
        settings = FormSettings.for_device(self.config, device)
        key = (settings.root_method, settings.gram_tf32)
        if key not in self._forms:
            self._forms[key] = make_form(self.config.precond, settings)
        return self._forms[key]

    @staticmethod
    @lru_cache(maxsize=4096)
    def _plan_cached(
        shape: tuple[int, ...], max_dim: int, aspect: float, min_numel: int, split: str
    ) -> BlockPlan | None:
        return plan_blocks(shape, max_dim, aspect, min_numel, split)

    def block_plan(self, shape: torch.Size | tuple[int, ...]) -> BlockPlan | None:
        """How a parameter of ``shape`` is cut into blocks (None: first-order step only)."""
        c = self.config
        return self._plan_cached(
            tuple(shape), c.max_precond_dim, c.max_aspect_ratio, c.min_precond_numel, c.block_split
        )

    def state_bytes(self, p: torch.Tensor) -> dict[str, int]:
        """Bytes of the state held for parameter ``p``, by memory kind (``hf_q4shampoo.memory.KINDS``).

        ``first_order`` (moments, as codes or fp32) and their ``scales_diagonals`` (block scales, rank-1
        maxima); the preconditioner form's ``statistics``, ``roots``, ``error_feedback`` and
        ``scales_diagonals`` (``PreconditionerForm.bytes_by_kind``); ``other`` (the step and skip counters).
        Empty before ``p``'s first step (or :meth:`build_state`). This is what the memory report and the estimate read.
        """
        state = self.state.get(p)
        if not state:
            return {}
        local = _local(p)
        out: dict[str, int] = defaultdict(int)
        for kind, b in moment_bytes_by_kind(state, local.numel()).items():
            out[kind] += b
        out["other"] += tensor_bytes(state["step"])
        if "skipped_updates" in state:  # the non-finite guard's counter
            out["other"] += tensor_bytes(state["skipped_updates"])
        if state.get("regions"):
            form = self._form(local.device)
            for sides in state["regions"]:
                for side in sides.values():
                    for kind, b in form.bytes_by_kind(side).items():
                        out[kind] += b
        return dict(out)

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        check_dense_real(p, "Q4Shampoo")
        flattened = (
            getattr(p, "_fsdp_flattened", False)
            or getattr(p, "_is_flat_param", False)
            or any(hasattr(p, marker) for marker in _DEEPSPEED_MARKERS)
        )
        if flattened:
            raise RuntimeError(
                "Q4Shampoo received a flattened 1-D view of model parameters (FSDP1 FlatParameter or "
                "DeepSpeed ZeRO >= 1 partition), so the matrix shapes it needs are lost. Supported: single "
                "device, DDP, FSDP2 (fully_shard / accelerate fsdp_version=2) and DeepSpeed ZeRO stage 0."
            )

    def build_state(self) -> None:
        """Create the state of every parameter now instead of at its first step.

        Works on parameters on the ``meta`` device, which is how ``estimate_memory`` sizes the state of a
        model without allocating it: the layout is the one the first step would create.
        """
        foreign = self._foreign_ids()
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p] and id(p) not in foreign:
                    self._init_state(p, self.state[p])

    def _refresh_offsets(self) -> dict[int, tuple[int, int]]:
        """``(statistics offset, root offset)`` of every matrix parameter, by id (``schedule.refresh_offsets``)."""
        c = self.config
        update_freq, root_freq = c.schedule()
        stats_spread = min(c.statistics_spread, c.refresh_spread) if c.statistics_spread else c.refresh_spread
        spreads = (min(stats_spread, update_freq), min(c.refresh_spread, root_freq))
        params = [(gi, _local(p).shape, id(p)) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        key = (spreads, tuple(pid for _, _, pid in params))
        if getattr(self, "_offset_key", None) != key:
            self._offset_key = key
            shift = root_shift(update_freq, root_freq, spreads)
            self._offsets = {
                pid: (stats, root + shift)
                for pid, (stats, root) in refresh_offsets(params, self.block_plan, spreads).items()
            }
        return self._offsets

    # ---- several ranks (DDP): distributed.py ---------------------------------------------------
    def _ddp_split(self) -> DdpSplit | None:
        """The ranks sharing the preconditioner work, or None (one process, FSDP2, ``shard_preconditioners``
        off). Decided once, at the first step (or ``load_state_dict``), from the process group then."""
        if "_split" not in self.__dict__:
            params = [p for g in self.param_groups for p in g["params"]]
            self._split = split_for(self.config.shard_preconditioners, params)
        return self._split

    def _owners(self) -> dict[int, int]:
        """The owner rank of every parameter some rank owns, by id; the same on every rank (it depends only on
        the parameters' shapes and order). The preconditioner split owns matrix parameters, ``shard_parameters``
        every parameter that requires a gradient; both balanced by
        ``owner_balance.assign_owners`` over modelled milliseconds (``step_share_cost`` per step,
        ``refresh_round_ms`` per refresh step), then refined against each step's busiest rank."""
        params = [p for g in self.param_groups for p in g["params"]]
        key = tuple(id(p) for p in params)
        if self.__dict__.get("_owner_key") != key:
            offsets = self._refresh_offsets()
            split = self._ddp_split()
            whole = self._shards_parameters()
            update_freq, root_freq = self.config.schedule()
            # shard_parameters: an owner does the whole step of every trainable parameter it owns; the split: an
            # owner computes the statistics and roots of its matrices, the update stays on every rank
            owned = [p for p in params if (p.requires_grad if whole else id(p) in offsets)]
            refresh = [refresh_cost(self.block_plan(_local(p).shape)) if id(p) in offsets else 0 for p in owned]
            # In milliseconds: the total is the per-step share (shard_parameters adds the every-step update,
            # ``numel``); each refresh step carries one statistics or root round, balanced step by step because
            # the ranks meet at every step's collective. A root round costs ~10x a statistics round of the same
            # matrix: weighed with one cost (before v21) the split's root steps drifted apart once
            # statistics_spread=5 packed the statistics (root exchange 0.86 -> 1.73 ms), and balanced by the
            # total alone shard_parameters' all-gather averaged 2.9-3.6 ms against its 1.1 ms median.
            units = [
                (
                    step_share_cost(r, p.numel() if whole else 0, update_freq, root_freq),
                    *offsets.get(id(p), (0, 0)),
                    *refresh_round_ms(r),
                )
                for r, p in zip(refresh, owned)
            ]
            owners = assign_owners(units, split.world_size, (update_freq, root_freq))
            self._owner_key, self._owner_by_id = key, {id(p): o for p, o in zip(owned, owners)}
            # shard_parameters: what this rank leaves to others, and what each rank sends after the update
            self._foreign = frozenset(id(p) for p, o in zip(owned, owners) if whole and o != split.rank)
            self._params_by_owner = [[p for p, o in zip(owned, owners) if o == r] for r in range(split.world_size)]
        return self._owner_by_id

    def _shards_parameters(self) -> bool:
        """``shard_parameters`` in effect: DDP with the work split, each owner updating its parameters whole."""
        return self.config.shard_parameters and self._ddp_split() is not None

    def _statistics_elsewhere(self, p: torch.Tensor) -> bool:
        """Under the preconditioner split (not ``shard_parameters``): another rank keeps ``p``'s statistics and
        error feedback, this one only its roots (``strip_statistics``)."""
        split = self._ddp_split()
        if split is None or self._shards_parameters():
            return False
        return self._owners().get(id(p), split.rank) != split.rank

    def _foreign_ids(self) -> frozenset[int]:
        """Ids of the parameters other ranks update whole (``shard_parameters``); empty otherwise."""
        if not self._shards_parameters():
            return frozenset()
        self._owners()
        return self._foreign

    def distributed_info(self) -> dict[str, Any] | None:
        """Under DDP with the work split (``shard_preconditioners``): this rank, the world size, how many
        parameters each rank owns (``owned_per_rank``: matrices under the preconditioner split, every trainable
        parameter under ``shard_parameters``) and what the exchanges moved so far (``ExchangeCounters``); else
        None."""
        split = self._ddp_split()
        if split is None:
            return None
        owned = [0] * split.world_size
        for owner in self._owners().values():
            owned[owner] += 1
        return {
            "rank": split.rank,
            "world_size": split.world_size,
            "owned_per_rank": owned,
            **split.counters.as_dict(),
        }

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        local = _local(p)
        cfg = self.config
        state["step"] = torch.tensor(0.0)
        state["skipped_updates"] = torch.zeros((), dtype=torch.int64, device=local.device)
        plan = self.block_plan(local.shape)
        state.update(
            init_first_order_state(
                local,
                cfg.first_order,
                cfg.first_order_bits,
                cfg.first_order_min_quant_numel,
                second_moment_mode(cfg.first_order_v, plan),
                cfg.first_order_m_map,
                m_block=cfg.first_order_m_block,
            )
        )
        if plan is not None:
            form = self._form(local.device)
            regions = []
            for region in plan.regions:
                sides = {}
                if region.precond_rows:
                    sides["L"] = form.init_state(region.block_rows, region.num_blocks, local.device)
                if region.precond_cols:
                    sides["R"] = form.init_state(region.block_cols, region.num_blocks, local.device)
                regions.append(sides)
            state["regions"] = regions
            state["refresh_offset"], state["root_offset"] = self._refresh_offsets().get(id(p), (0, 0))
            if self._statistics_elsewhere(p):
                strip_statistics(state)  # another rank keeps this parameter's statistics (distributed.py)

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

        sharding = self._shards_parameters()  # the same on every rank: so is joining the exchange below
        grads, steps = step_gradients(
            self.param_groups, self.state, self._init_state, self._check_param, self._foreign_ids()
        )
        if grads:
            self._update(grads, steps, sharding)
        if sharding:  # every rank joins, also one that owns nothing with a gradient this step
            with self._stage("parameters_exchange"):
                self._ddp_split().share_parameters(self._params_by_owner)
        return loss

    def _update(self, grads: dict[int, torch.Tensor], steps: dict[int, int], sharding: bool) -> None:
        """The step of the parameters with gradients this rank updates (all of them but under ``shard_parameters``)."""
        layout = self._current_layout()
        batches = step_batches(layout, grads, steps)
        cfg = self.config
        update_freq, root_freq = cfg.schedule()
        start, early = cfg.start_precond_step, cfg.first_root()
        for b in batches:
            if b.group.plan is not None:
                states = [b.group.states[m] for m in b.members]
                b.stats_due = [
                    i for i, s in enumerate(states) if _is_due(b.step, update_freq, start, s["refresh_offset"])
                ]
                b.roots_due = [
                    i for i, s in enumerate(states) if _root_due(b.step, root_freq, start, s["root_offset"], early)
                ]
                b.ready = [
                    i for i, s in enumerate(states) if b.step >= _first_root(root_freq, start, s["root_offset"], early)
                ]
        split = self._ddp_split()
        # shard_parameters: this rank's batches hold only the parameters it owns: nothing to filter
        shared = keep_owned_work(batches, split.rank) if split is not None and not sharding else []
        # paper 2's order: statistics, roots, then L^ G R^, grafting and the first-order step; the refreshes skip
        # non-finite members (the statistics flag theirs, eagerly or inside their graph), the update flags its own
        self._refresh_settled = True
        if any(b.stats_due for b in batches):
            with self._stage("statistics"):
                self._run_statistics(layout, batches)
        rooting = [b for b in batches if b.roots_due]
        if rooting:
            flag_finite([b for b in rooting if b.finite is None])
            with self._stage("roots"):
                self._refresh_roots(batches)
        if shared:  # the same list on every rank: all join the all-gather of the refreshed 4-bit roots
            with self._stage("roots_exchange"):
                split.exchange_roots(shared)
        self._run_update(layout, batches)

    def _current_layout(self) -> Layout:
        """The persistent layout of every parameter that has state (rebuilt when that set changes)."""
        members = layout_members(self.param_groups, self.state)
        key = (self._layout_version, tuple(id(s) for _, _, s in members))
        layout = self.__dict__.get("_layout")
        if layout is None or layout.key != key:
            owners = None
            if self._ddp_split() is not None and not self._shards_parameters():
                by_id = self._owners()
                owners = [by_id.get(id(p)) for _, p, _ in members]
            layout = self._layout = build_layout(members, self.block_plan, first_order_keys, key, owners)
            if layout.buckets:  # designed on the host (~0.3 s once): now, not as a stall at the first root
                linalg.newton_schedule(4, self.config.matrix_eps, self.config.newton_tol, self.config.newton_max_iters)
            run_first_step_warm_ups(self, layout)  # compiles and loads now what later steps would (warmup.py)
        return layout

    # ---- the graphed update's hooks (graphed_update.py) ----------------------------------------
    GRAPH_OWNER = "Q4Shampoo"

    def _graph_config_ok(self) -> bool:
        """The options under which the update can be graphed: the first-order step reads its lr from the device
        (AdamW, compiled / fused), the direction is norm-grafted, and the process setup allows it (below)."""
        cfg = self.config
        options = bool(cfg.use_compile) and cfg.first_order == "adamw" and cfg.grafting == "norm"
        return options and self._graph_allowed_under_ddp()

    def _graph_allowed_under_ddp(self) -> bool:
        """One process, or ``shard_parameters``: each owner updates its parameters alone and all-gathers them, so
        every replica holds the owner's bytes whether or not each rank's own trial kept the graph. Not under the
        preconditioner split, where every rank updates every parameter itself: ranks that chose differently
        (graphed chunks round differently in the last bits) would drift apart."""
        return self._ddp_split() is None or self._shards_parameters()

    # ---- inspection and small helpers ---------------------------------------------------------
    def _direction(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The preconditioned, norm-grafted direction the current roots give ``grad`` for parameter ``p``
        (no state changes; for tests and inspection). Not defined for ``grafting="adam"``, whose direction
        depends on the second moment's update by ``grad``."""
        if self.config.grafting != "norm":
            raise NotImplementedError("Q4Shampoo._direction: only for grafting='norm'")
        state = self.state[p]
        for group in self._current_layout().groups:
            for m, s in enumerate(group.states):
                if s is state:
                    if group.plan is None:
                        return grad.float()
                    batch = StepBatch(group, [m], int(state["step"]), [grad])
                    g2 = grad.float().reshape(1, *group.plan.matrix_shape)
                    return self._graft(g2, self._precondition(batch, g2, [0]), [0], batch)[0][0].reshape(grad.shape)
        raise KeyError("parameter has no Q4Shampoo state yet")

    def _index(self, rows: list[int], device: torch.device) -> torch.Tensor:
        cache = self.__dict__.get("_index_cache")
        if cache is None:
            cache = self._index_cache = IndexCache()
        return cache(rows, device)

    def _gram_tf32(self, device: torch.device) -> bool:
        return FormSettings.for_device(self.config, device).gram_tf32

    def _apply_dtype(self, device: torch.device) -> torch.dtype:
        choice = self.config.apply_dtype
        if choice == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return torch.bfloat16 if choice == "bfloat16" else torch.float32
