"""``Q4Shampoo``: Shampoo with 4-bit preconditioners and 4-bit first-order states.

One step, for every matrix parameter W with gradient G (paper 2 Algorithm 4; papers.md §1.1)::

    if t % update_freq == 0:  L <- beta L + (1-beta) G G^T ;  R <- beta R + (1-beta) G^T G   (per block)
    if t % root_freq   == 0:  L^ <- (L + eps lmax I)^-1/4 ;  R^ <- (R + eps lmax I)^-1/4
    G^ = L^ G R^                                  (per block, merged back)
    G~ = G^ * ||G||_F / ||G^||_F                  (norm grafting, per tensor)
    W  <- first_order_step(W, G~)                 (AdamW or SGD-momentum)

How L, R and the roots are *stored* is the job of a preconditioner form (``preconditioners.py``);
how a parameter is cut into blocks is ``blocking.py``. Blocks of the same order are concatenated
across all parameters so every stage is a handful of batched tensor ops.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import lru_cache
from typing import Any

import torch

from .blocking import BlockPlan, extract_blocks, insert_blocks, plan_blocks
from .config import GROUP_KEYS, STATE_LAYOUT_KEYS, ConfigError, Q4ShampooConfig
from .first_order import adamw_group_step, init_first_order_state, sgd_group_step
from .preconditioners import FormSettings, PreconditionerForm, make_form
from .preconditioners import state_order as side_order

__all__ = ["Q4Shampoo"]

_GRAFT_EPS = 1e-12


def _is_due(step: int, freq: int, start: int, offset: int) -> bool:
    """Refresh on steps t >= start where t - offset is a positive multiple of ``freq``."""
    return step >= start and step > offset and (step - offset) % freq == 0


def _first_due(freq: int, start: int, offset: int) -> int:
    return offset + freq * max(1, math.ceil((start - offset) / freq))


def _refresh_cost(plan: BlockPlan) -> int:
    """Work of one refresh of a parameter's factors, ~ sum of K n^3 (Cholesky / roots are cubic)."""
    cost = 0
    for r in plan.regions:
        cost += r.num_blocks * ((r.block_rows**3 if r.precond_rows else 0) + (r.block_cols**3 if r.precond_cols else 0))
    return cost


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _cat_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(states) == 1:
        return dict(states[0])
    return {key: torch.cat([s[key] for s in states]) for key in states[0]}


def _scatter_states(big: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> None:
    """Write the rows of ``big`` back into the per-parameter side states they came from."""
    sizes = [next(iter(t.values())).shape[0] for t in targets]
    parts = {key: value.split(sizes) for key, value in big.items()}
    for i, target in enumerate(targets):
        target.clear()
        target.update({key: parts[key][i] for key in big})


class Q4Shampoo(torch.optim.Optimizer):
    """Shampoo with 4-bit preconditioners (Cholesky + error feedback by default).

    Args:
        params: parameters or parameter groups (dicts may set ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``momentum``, ``nesterov``). Empty groups are allowed.
        lr, betas, eps, weight_decay: first-order hyper-parameters (defaults 1e-3, (0.9, 0.999),
            1e-8, 0.0). ``lr`` may be a tensor (e.g. driven by a scheduler).
        config: a :class:`Q4ShampooConfig`; keyword options below override its fields.
        **options: any other :class:`Q4ShampooConfig` field, e.g. ``precond="eigen"``,
            ``update_freq=10``, ``root_freq=50``, ``first_order="sgd"``, ``momentum=0.9``.

    Matrices (after dropping size-1 dims and flattening trailing dims) are preconditioned; 1-D
    tensors and matrices under ``min_precond_numel`` take the first-order step alone. State is
    created lazily on the parameter's device at its first step.
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
            overrides["lr"] = float(lr_tensor)
        base = config or Q4ShampooConfig()
        cfg = base.replace(**overrides) if overrides else base
        self.config = cfg
        defaults = cfg.group_defaults()
        if lr_tensor is not None:
            defaults["lr"] = lr_tensor
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._validate_group(group)
        self._settings = FormSettings(
            **{k: getattr(cfg, k) for k in FormSettings.__dataclass_fields__ if k != "root_method"},
            root_method="eigh",
        )
        self._forms: dict[str, PreconditionerForm] = {}
        #: Optional ``name -> context manager`` factory that profiling tools set to time the stages of a
        #: step ("statistics", "roots", "apply", "grafting", "first_order"); None costs nothing.
        self.stage_timer: Callable[[str], Any] | None = None

    def _stage(self, name: str):
        return nullcontext() if self.stage_timer is None else self.stage_timer(name)

    # ------------------------------------------------------------------------------------------
    # configuration helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        # Other libraries put their own keys in groups (names, initial_lr, ...): only ours are checked.
        checked = {k: group[k] for k in GROUP_KEYS if k in group}
        lr = checked.get("lr")
        if isinstance(lr, torch.Tensor):
            checked["lr"] = float(lr)
        if isinstance(checked.get("betas"), list):
            checked["betas"] = tuple(checked["betas"])
        Q4ShampooConfig().replace(**checked)

    def _form(self, device: torch.device) -> PreconditionerForm:
        method = self.config.root_method
        if method == "auto":
            method = "eigh" if device.type == "cpu" else "newton"
        if method not in self._forms:
            settings = FormSettings(**{**self._settings.__dict__, "root_method": method})
            self._forms[method] = make_form(self.config.precond, settings)
        return self._forms[method]

    @staticmethod
    @lru_cache(maxsize=4096)
    def _plan_cached(shape: tuple[int, ...], max_dim: int, aspect: float, min_numel: int) -> BlockPlan | None:
        return plan_blocks(shape, max_dim, aspect, min_numel)

    def block_plan(self, shape: torch.Size | tuple[int, ...]) -> BlockPlan | None:
        """How a parameter of ``shape`` is cut into blocks (None: first-order step only)."""
        c = self.config
        return self._plan_cached(tuple(shape), c.max_precond_dim, c.max_aspect_ratio, c.min_precond_numel)

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(
                "Q4Shampoo does not support sparse gradients. Use dense gradients (e.g. "
                "nn.Embedding(sparse=False)) or torch.optim.SparseAdam for sparse embeddings."
            )
        if torch.is_complex(p) or torch.is_complex(grad):
            raise RuntimeError(
                "Q4Shampoo does not support complex parameters. Optimise torch.view_as_real(param) "
                "as a real parameter instead."
            )
        flattened = (
            getattr(p, "_fsdp_flattened", False)
            or getattr(p, "_is_flat_param", False)
            or hasattr(p, "ds_id")
            or ("deepspeed" in sys.modules and p.ndim == 1 and p.numel() >= 2**20)
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
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, self.state[p])

    def _refresh_offsets(self) -> dict[int, int]:
        """Offset of every matrix parameter's refreshes (see ``refresh_spread``), by ``id(param)``.

        Greedy balancing, largest first, over all parameters of the optimizer in group order, so the
        assignment depends only on the parameter list (and a resumed run reads the saved offsets).
        """
        c = self.config
        spread = min(c.refresh_spread, *c.schedule())
        key = (spread, tuple(id(p) for g in self.param_groups for p in g["params"]))
        if getattr(self, "_offset_key", None) == key:
            return self._offsets
        costs = []
        for p in (p for g in self.param_groups for p in g["params"]):
            plan = self.block_plan(_local(p).shape)
            if plan is not None:
                costs.append((-_refresh_cost(plan), len(costs), id(p)))
        load = [0] * spread
        offsets = {}
        for neg_cost, _, pid in sorted(costs):
            slot = min(range(spread), key=lambda s: (load[s], s))
            load[slot] -= neg_cost
            offsets[pid] = slot
        self._offset_key, self._offsets = key, offsets
        return offsets

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        local = _local(p)
        state["step"] = torch.tensor(0.0)
        state.update(init_first_order_state(local, self.config.first_order, self.config.first_order_bits))
        plan = self.block_plan(local.shape)
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
                self._precompile(form, sides.values(), local.device)
            state["regions"] = regions
            state["refresh_offset"] = self._refresh_offsets().get(id(p), 0)

    def _precompile(self, form: PreconditionerForm, sides, device: torch.device) -> None:
        """Decode each new root order once now, so its compilation (accelerators only) happens at the
        first step instead of in the middle of training when preconditioning starts."""
        if not self.config.use_compile or device.type in ("cpu", "meta"):
            return
        warmed = self.__dict__.setdefault("_warmed_orders", set())
        for side in sides:
            key = (device, side_order(side))
            if key not in warmed:
                warmed.add(key)
                # a stack of one and of two roots: dynamo specializes a batch of size 1 separately
                one = {k: v[:1] for k, v in side.items()}
                form.root(one, self._apply_dtype(device))
                form.root(_cat_states([one, one]), self._apply_dtype(device))

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work = []  # (param, grad, group index, state) of the parameters that have a gradient
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_param(p)
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                local_p, local_g = _local(p), _local(p.grad)
                if local_p.numel() == 0:
                    continue
                work.append((local_p, local_g, gi, state))
        if not work:
            return loss
        counters = [state["step"] for *_, state in work]
        torch._foreach_add_(counters, 1.0)  # CPU tensors: no device sync, one op for all
        steps = [int(s) for s in torch.stack(counters).tolist()]

        directions = self._shampoo_directions(work, steps)
        with self._stage("first_order"):
            self._first_order_steps(work, steps, directions)
        return loss

    def _first_order_steps(self, work: list, steps: list[int], directions: dict[int, torch.Tensor]) -> None:
        """The AdamW / SGD step, batched over tensors that share parameter group, shape, dtype and step."""
        cfg = self.config
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i, (p, _g, gi, _state) in enumerate(work):
            batches[(gi, tuple(p.shape), p.dtype, p.device, steps[i])].append(i)
        for (gi, _shape, _dtype, _device, step), idx in batches.items():
            group = self.param_groups[gi]
            params = [work[i][0] for i in idx]
            states = [work[i][3] for i in idx]
            dirs = torch.stack([directions[i] if i in directions else work[i][1] for i in idx]).float()
            if cfg.first_order == "adamw":
                adamw_group_step(
                    params, dirs, states, step=step, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                    weight_decay=group["weight_decay"], bits=cfg.first_order_bits, compile_=cfg.use_compile,
                )
            else:
                sgd_group_step(
                    params, dirs, states, lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                    weight_decay=group["weight_decay"], bits=cfg.first_order_bits, compile_=cfg.use_compile,
                )

    def _shampoo_directions(self, work: list, steps: list[int]) -> dict[int, torch.Tensor]:
        """Preconditioned, grafted directions for the Shampoo parameters in ``work`` (by index).

        In the order of paper 2's Algorithm 4: statistics, roots, ``L^ G R^``, grafting.
        """
        cfg = self.config
        update_freq, root_freq = cfg.schedule()
        items = []  # (index, grad 2-D fp32, plan, state, step)
        for i, (p, g, _group, state) in enumerate(work):
            if "regions" in state:
                plan = self.block_plan(p.shape)
                items.append((i, g.float().reshape(plan.matrix_shape), plan, state, steps[i]))
        if not items:
            return {}
        due = [it for it in items if _is_due(it[4], update_freq, cfg.start_precond_step, it[3]["refresh_offset"])]
        with self._stage("statistics"):
            self._update_statistics(due)
        due = [it for it in items if _is_due(it[4], root_freq, cfg.start_precond_step, it[3]["refresh_offset"])]
        with self._stage("roots"):
            self._refresh_roots(due)
        # until a parameter's first root, its roots are the identity and its direction is the gradient
        ready = [it for it in items if it[4] >= _first_due(root_freq, cfg.start_precond_step, it[3]["refresh_offset"])]
        with self._stage("apply"):
            outputs = self._precondition(ready)
        with self._stage("grafting"):
            self._graft(outputs, {i: g2d for i, g2d, *_ in ready})
        return {i: out.reshape(work[i][0].shape) for i, out in outputs.items()}

    def _update_statistics(self, items: list) -> None:
        """``L <- beta L + (1 - beta) G G^T`` (and R), batched per factor order across parameters."""
        jobs: dict[tuple, list] = defaultdict(list)
        for _i, g2d, plan, state, _step in items:
            for region, sides in zip(plan.regions, state["regions"]):
                blocks = extract_blocks(g2d, region)
                if "L" in sides:
                    jobs[(blocks.device, region.block_rows)].append((sides["L"], blocks @ blocks.mT))
                if "R" in sides:
                    jobs[(blocks.device, region.block_cols)].append((sides["R"], blocks.mT @ blocks))
        for (device, _n), bucket in jobs.items():
            targets = [side for side, _ in bucket]
            big = _cat_states(targets)
            self._form(device).update_statistics(big, torch.cat([gram for _, gram in bucket]))
            _scatter_states(big, targets)

    def _refresh_roots(self, items: list) -> None:
        """Recompute the stored inverse roots, batched per factor order across parameters."""
        jobs: dict[tuple, list] = defaultdict(list)
        for _i, g2d, plan, state, _step in items:
            for region, sides in zip(plan.regions, state["regions"]):
                for name, side in sides.items():
                    n = region.block_rows if name == "L" else region.block_cols
                    jobs[(g2d.device, n)].append(side)
        for (device, _n), targets in jobs.items():
            big = _cat_states(targets)
            self._form(device).refresh_root(big)
            _scatter_states(big, targets)

    def _precondition(self, items: list) -> dict[int, torch.Tensor]:
        """``G^ = L^ G R^`` for every block, batched per block shape across parameters."""
        jobs: dict[tuple, list] = defaultdict(list)
        outputs: dict[int, torch.Tensor] = {}
        for i, g2d, plan, state, _step in items:
            outputs[i] = torch.empty_like(g2d)
            for region, sides in zip(plan.regions, state["regions"]):
                key = (g2d.device, region.block_rows, region.block_cols, "L" in sides, "R" in sides)
                jobs[key].append((i, region, sides, extract_blocks(g2d, region)))
        for (device, _a, _b, has_l, has_r), bucket in jobs.items():
            form = self._form(device)
            dtype = self._apply_dtype(device)
            blocks = torch.cat([blk for *_, blk in bucket]) if len(bucket) > 1 else bucket[0][3]
            blocks = blocks.to(dtype)
            if has_l:
                blocks = form.root(_cat_states([sides["L"] for _, _, sides, _ in bucket]), dtype) @ blocks
            if has_r:
                blocks = blocks @ form.root(_cat_states([sides["R"] for _, _, sides, _ in bucket]), dtype)
            for (i, region, _sides, _), part in zip(bucket, blocks.split([r.num_blocks for _, r, _, _ in bucket])):
                insert_blocks(outputs[i], region, part)
        return outputs

    @staticmethod
    def _graft(outputs: dict[int, torch.Tensor], grads: dict[int, torch.Tensor]) -> None:
        """Rescale each parameter's direction to the Frobenius norm of its gradient (batched norms)."""
        if not outputs:
            return
        order = list(outputs)
        outs = [outputs[i] for i in order]
        grad_norms = torch._foreach_norm([grads[i] for i in order])
        out_norms = torch._foreach_add(torch._foreach_norm(outs), _GRAFT_EPS)
        torch._foreach_mul_(outs, torch._foreach_div(grad_norms, out_norms))

    def _apply_dtype(self, device: torch.device) -> torch.dtype:
        choice = self.config.apply_dtype
        if choice == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return torch.bfloat16 if choice == "bfloat16" else torch.float32

    # ------------------------------------------------------------------------------------------
    # state dict
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["q4shampoo_config"] = self.config.to_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every state tensor's saved dtype (uint8 codes stay uint8).

        torch's base class casts floating-point state to the parameter's dtype; that would turn
        4-bit codes into floats and fp32 statistics into bf16. We let it do the bookkeeping, then
        put back the saved tensors, moved to each parameter's device.
        """
        saved_cfg = state_dict.get("q4shampoo_config")
        if saved_cfg is not None:
            diffs = [k for k in STATE_LAYOUT_KEYS if k in saved_cfg and saved_cfg[k] != getattr(self.config, k)]
            if diffs:
                detail = ", ".join(f"{k}: saved {saved_cfg[k]!r}, now {getattr(self.config, k)!r}" for k in diffs)
                raise ConfigError(
                    "Q4Shampoo: the checkpoint's optimizer state was made with other storage options "
                    f"({detail}); construct the optimizer with the saved values to resume."
                )
        saved_state = state_dict["state"]
        inner = {k: v for k, v in state_dict.items() if k != "q4shampoo_config"}
        super().load_state_dict(inner)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if index in saved_state:
                self.state[p] = _restore(saved_state[index], _local(p).device)


def _restore(value: Any, device: torch.device) -> Any:
    """A saved state value with its tensors on ``device`` and their saved dtypes.

    The step counter stays a CPU fp32 tensor so reading it never waits for the accelerator.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {
            k: v.to("cpu", torch.float32) if k == "step" and isinstance(v, torch.Tensor) else _restore(v, device)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_restore(v, device) for v in value]
    return value
