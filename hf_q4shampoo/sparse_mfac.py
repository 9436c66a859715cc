"""``SparseMFAC``: M-FAC with an error-feedback-compressed gradient window (EFCP, arXiv 2306.06098).

One step, per parameter group, with the group's gradients flattened into one vector ``g`` of length ``d``
(papers.md §5.1; the EFCP repository's ``SparseGradientMFAC`` with ``wd_type="wd"``)::

    a = e + g                         # error feedback: add what earlier compressions dropped
    c = TopK_k(a)   (or rank-r P Q^T) # compress
    e = a - c                         # keep the remainder for later steps
    ring slot (t-1) mod m  <-  c      # window of the last m compressed gradients, rows of G
    D[s, :] = D[:, s] = G c           # m x m inner products, one row/column per step
    u = F^{-1} c,  F = damp I + (1/m) G^T G        # M-FAC's dynamic algorithm on D
    v = momentum v + u                 (when momentum > 0)
    p <- (1 - weight_decay) p - lr v   (weight decay as EFCP's "wd"; lr-scaled with lr_scaled_decay)

Because ``c`` is the newest row of ``G``, ``G c`` is the new column of ``D`` and Woodbury reduces to
``u = m G^T (damp m I + D)^{-1} e_s``: the same vector as ``(c - G^T (damp m I + D)^{-1} G c) / damp``
without that form's cancellation, which at ``damp = 1e-7`` would cost fp32 most of its digits. The
window storage and the sparse / low-rank products are in :mod:`hf_q4shampoo.mfac_window`, the options
and their ``--optim_args`` parsing in :mod:`hf_q4shampoo.sparse_mfac_config`.

The per-group state (one window, error accumulator, ``D`` and momentum per group) lives in the
state of the group's first parameter, so ``state_dict()`` is torch's usual layout of plain tensors
and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .config import ConfigError
from .mfac_window import LowRankWindow, TopKWindow, inverse_fisher_coefficients
from .sparse_mfac_config import (
    SPARSE_MFAC_GROUP_KEYS,
    SPARSE_MFAC_LAYOUT_KEYS,
    STATE_KINDS,
    SparseMFACConfig,
    parse_sparse_mfac_optim_args,
)

__all__ = [
    "SparseMFAC",
    "SparseMFACConfig",
    "parse_sparse_mfac_optim_args",
    "SPARSE_MFAC_GROUP_KEYS",
    "SPARSE_MFAC_LAYOUT_KEYS",
    "STATE_KINDS",
]


# ------------------------------------------------------------------------------------------------
# the optimizer
# ------------------------------------------------------------------------------------------------


class SparseMFAC(torch.optim.Optimizer):
    """M-FAC preconditioning on a window of error-feedback-compressed gradients (EFCP, ICML 2024).

    Args:
        params: parameters or parameter groups; each group is preconditioned as one flattened vector
            (pass one group to precondition the whole model jointly, as the paper does).
        lr, weight_decay, momentum, damp: per-group defaults (see :class:`SparseMFACConfig`).
        config: a :class:`SparseMFACConfig` to start from; any other keyword replaces one of its fields.

    Sparse and complex gradients are refused; a parameter without a gradient counts as a zero gradient
    while others in its group have one (the flattened layout stays fixed). All of a group's parameters
    must be on one device. DTensor (FSDP2) parameters are not supported.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor | None = None,
        *,
        config: SparseMFACConfig | None = None,
        **options: Any,
    ):
        if lr is not None:
            options["lr"] = float(lr)
        base = config or SparseMFACConfig()
        self.config = base.replace(**options) if options else base
        super().__init__(params, self.config.group_defaults())
        for group in self.param_groups:
            checked = {k: group[k] for k in SPARSE_MFAC_GROUP_KEYS if k in group}
            if isinstance(checked.get("lr"), torch.Tensor):
                checked["lr"] = float(checked["lr"])
            self.config.replace(**checked)  # validates per-group overrides
        self._windows: dict[int, TopKWindow | LowRankWindow] = {}

    # ------------------------------------------------------------------------------------------
    # layout
    # ------------------------------------------------------------------------------------------
    def window(self, group_index: int) -> TopKWindow | LowRankWindow:
        """The window layout of parameter group ``group_index`` (its size is fixed by the group's params)."""
        if group_index not in self._windows:
            params = self.param_groups[group_index]["params"]
            c = self.config
            if c.variant == "lowrank":
                win: TopKWindow | LowRankWindow = LowRankWindow.for_shapes(c.m, [p.shape for p in params], c.rank)
            else:
                d = sum(p.numel() for p in params)
                k = c.k_for(d)
                dense = c.window_format == "dense" or (c.window_format == "auto" and k == d)
                win = TopKWindow(c.m, d, k, dense)
            self._windows[group_index] = win
        return self._windows[group_index]

    def group_state(self, group_index: int) -> dict[str, Any]:
        """The state of group ``group_index`` (kept in the state of its first parameter; empty before a step)."""
        params = self.param_groups[group_index]["params"]
        return self.state[params[0]] if params else {}

    @staticmethod
    def _check_param(p: torch.Tensor, device: torch.device) -> None:
        grad = p.grad
        if grad is not None and grad.is_sparse:
            raise RuntimeError(
                "SparseMFAC does not support sparse gradients (torch.sparse layouts). Use dense gradients "
                "(e.g. nn.Embedding(sparse=False))."
            )
        if torch.is_complex(p) or (grad is not None and torch.is_complex(grad)):
            raise RuntimeError(
                "SparseMFAC does not support complex parameters. Optimise torch.view_as_real(param) instead."
            )
        if hasattr(p, "to_local") or hasattr(p, "device_mesh"):
            raise RuntimeError("SparseMFAC does not support DTensor (FSDP2) parameters yet.")
        if p.device != device:
            raise RuntimeError(
                f"SparseMFAC flattens each parameter group into one vector, so a group's parameters must share "
                f"one device; found {p.device} and {device}."
            )

    def _init_group_state(self, group_index: int, state: dict[str, Any], device: torch.device) -> None:
        m = self.config.m
        state["step"] = torch.zeros((), dtype=torch.float32)  # CPU: reading it never syncs the device
        self.window(group_index).init_state(state, device)
        state["dots"] = torch.zeros(m, m, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            params = group["params"]
            if not params or all(p.grad is None for p in params):
                continue
            device = params[0].device
            for p in params:
                self._check_param(p, device)
            self._group_step(group_index, group, params, device)
        return loss

    def _group_step(self, group_index: int, group: dict[str, Any], params: list[torch.Tensor], device) -> None:
        state = self.group_state(group_index)
        if not state:
            self._init_group_state(group_index, state, device)
        state["step"] += 1
        step = int(state["step"])
        m, slot = self.config.m, (step - 1) % self.config.m
        window = self.window(group_index)

        grad = _flatten_grads(params, window.d, device)
        row = window.insert(state, grad, slot, step)  # error feedback + compression into the ring
        dots = state["dots"]
        dots[slot, :] = row
        dots[:, slot] = row

        damp = float(group["damp"])
        unit = torch.zeros(m, dtype=torch.float64, device=device)
        unit[slot] = m
        coef = inverse_fisher_coefficients(dots, damp, unit).to(torch.float32)
        direction = window.combine(state, coef)  # u = F^{-1} c = m G^T (damp m I + D)^{-1} e_s

        momentum = float(group["momentum"])
        if momentum > 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(direction)
            direction = buf.mul_(momentum).add_(direction)
        _apply_update(params, direction, group, self.config.lr_scaled_decay)

    # ------------------------------------------------------------------------------------------
    # diagnostics
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def precondition(self, x: torch.Tensor, group_index: int = 0) -> torch.Tensor:
        """``F^{-1} x`` with the current window of group ``group_index`` (``x``: flattened, length d).

        The general Woodbury form ``(x - G^T (damp m I + D)^{-1} G x) / damp``; the step itself uses the
        cancellation-free form for its own compressed gradient (module docstring).
        """
        state = self.group_state(group_index)
        if not state:
            raise RuntimeError("SparseMFAC.precondition: the group has no window yet (call step() first).")
        window = self.window(group_index)
        x = x.reshape(-1).to(torch.float32)
        damp = float(self.param_groups[group_index]["damp"])
        coef = inverse_fisher_coefficients(state["dots"], damp, window.dots(state, x)).to(torch.float32)
        return (x - window.combine(state, coef)) / damp

    # ------------------------------------------------------------------------------------------
    # state dict
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sparse_mfac_config"] = self.config.to_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every state tensor's saved dtype.

        torch's base class casts floating-point state to the parameter's dtype, which would turn the
        fp64 inner-product matrix into fp32 (and fp32 windows into bf16 with bf16 parameters); we let it
        do the bookkeeping, then put back the saved tensors on the parameter's device.
        """
        saved = state_dict.get("sparse_mfac_config")
        if saved is not None:
            diffs = [k for k in SPARSE_MFAC_LAYOUT_KEYS if k in saved and saved[k] != getattr(self.config, k)]
            if diffs:
                detail = ", ".join(f"{k}: saved {saved[k]!r}, now {getattr(self.config, k)!r}" for k in diffs)
                raise ConfigError(
                    f"SparseMFAC: the checkpoint's optimizer state has another layout ({detail}); construct "
                    "the optimizer with the saved values to resume."
                )
        saved_state = state_dict["state"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "sparse_mfac_config"})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            if index in saved_state:
                self.state[p] = {
                    key: value.to("cpu", torch.float32) if key == "step" else value.to(p.device)
                    for key, value in saved_state[index].items()
                }


def _flatten_grads(params: list[torch.Tensor], d: int, device: torch.device) -> torch.Tensor:
    """The group's gradients as one fresh fp32 vector (zeros for parameters without a gradient)."""
    out = torch.zeros(d, dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            out[offset : offset + n].copy_(p.grad.reshape(-1))
        offset += n
    return out


def _apply_update(params: list[torch.Tensor], direction: torch.Tensor, group: dict[str, Any], lr_scaled: bool) -> None:
    """``p <- (1 - decay) p - lr * direction`` for every parameter's slice of the flat direction."""
    lr = float(group["lr"])
    decay = float(group["weight_decay"]) * (lr if lr_scaled else 1.0)
    views, offset = [], 0
    for p in params:
        views.append(direction[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    if decay:
        torch._foreach_mul_(params, 1.0 - decay)
    torch._foreach_add_(params, views, alpha=-lr)  # one launch per dtype on accelerators, not one per tensor
