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
window storage and the sparse / low-rank products are in :mod:`hf_q4shampoo.mfac_window`.

The per-group state (one window, error accumulator, ``D`` and momentum per group) lives in the
state of the group's first parameter, so ``state_dict()`` is torch's usual layout of plain tensors
and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch

from .config import ConfigError
from .mfac_window import LowRankWindow, TopKWindow, inverse_fisher_coefficients

__all__ = [
    "SparseMFAC",
    "SparseMFACConfig",
    "parse_sparse_mfac_optim_args",
    "SPARSE_MFAC_GROUP_KEYS",
    "SPARSE_MFAC_LAYOUT_KEYS",
    "STATE_KINDS",
]

VARIANTS = ("topk", "lowrank")
WINDOW_FORMATS = ("auto", "sparse", "dense")

#: Options that may differ between parameter groups (torch's ``defaults`` convention).
SPARSE_MFAC_GROUP_KEYS = ("lr", "weight_decay", "momentum", "damp")

#: Options that decide the saved state's layout; resuming with other values is refused.
SPARSE_MFAC_LAYOUT_KEYS = ("m", "k", "k_fraction", "variant", "rank", "window_format")

#: Memory kind (``hf_q4shampoo.memory.KINDS``) of each state tensor.
STATE_KINDS = {
    "window_values": "statistics",
    "window_left": "statistics",
    "window_right": "statistics",
    "window_exact": "statistics",
    "window_indices": "indices",
    "error": "error_feedback",
    "dots": "gram",
    "momentum_buffer": "first_order",
    "step": "other",
}


@dataclass(frozen=True)
class SparseMFACConfig:
    """Hyper-parameters of :class:`SparseMFAC` (EFCP's sparse M-FAC, papers.md §5).

    Window and compression:
        m: number of past compressed gradients in the window (M-FAC's ``ngrads``). The EFCP repository's
            BERT / GLUE commands use 1024; the default 10 keeps the window small for fine-tuning (the
            window grows by ``8 k`` bytes per slot and the m x m system by ``8 m^2``).
        k_fraction: top-k density, ``k = max(1, floor(k_fraction * d))`` per group (paper: 0.01).
        k: an absolute k per group instead (``min(k, d)``); give ``k`` or ``k_fraction``, not both.
        variant: ``"topk"`` (default) or ``"lowrank"`` (rank-``rank`` power-iteration compression of every
            matrix parameter; vectors stored exactly).
        rank: rank of the low-rank variant (EFCP's BERT commands: 4).
        window_format: ``"auto"`` (full fp32 rows when k == d, i.e. dense M-FAC; values + indices
            otherwise), ``"sparse"`` or ``"dense"`` (top-k only).

    Step (per group):
        lr: learning rate.
        damp: the damping ``lambda`` of ``F = lambda I + (1/m) sum c c^T`` (EFCP's BERT commands: 5e-5).
        momentum: ``v <- momentum v + u`` on the preconditioned direction (EFCP default 0).
        weight_decay: multiplicative decay ``p <- (1 - weight_decay) p`` before the update, as EFCP's
            ``wd_type="wd"`` (not scaled by lr: 0.01 shrinks the weights by 1% every step).
        lr_scaled_decay: decay ``p <- (1 - lr * weight_decay) p`` instead (AdamW's decoupled form, what
            ``--weight_decay`` means for AdamW).
    """

    lr: float = 1e-3
    m: int = 10
    k_fraction: float = 0.01
    k: int | None = None
    damp: float = 5e-5
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_scaled_decay: bool = False
    variant: str = "topk"
    rank: int = 4
    window_format: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            _validate(f.name, getattr(self, f.name))
        if self.variant == "lowrank" and self.window_format != "auto":
            raise ConfigError("SparseMFAC: window_format applies to variant='topk' only; leave it 'auto'.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def _check_names(cls, kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"SparseMFAC: unknown option(s) {', '.join(map(repr, unknown))}. "
                f"Allowed options: {', '.join(cls.field_names())}."
            )
        if kwargs.get("k") is not None and "k_fraction" in kwargs:
            raise ConfigError("SparseMFAC: give k (entries per group) or k_fraction (density), not both.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SparseMFACConfig":
        """Build from keyword arguments, naming any unknown key and the allowed ones."""
        cls._check_names(kwargs)
        return cls(**kwargs)

    def replace(self, **kwargs: Any) -> "SparseMFACConfig":
        """A copy with some fields changed (validated; unknown names are refused)."""
        self._check_names(kwargs)
        if kwargs.get("k_fraction") is not None and "k" not in kwargs:
            kwargs["k"] = None  # a new density replaces an absolute k
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (safe for ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def group_defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SPARSE_MFAC_GROUP_KEYS}

    def k_for(self, d: int) -> int:
        """Entries kept per step in a group of ``d`` entries."""
        if self.k is not None:
            return min(self.k, d)
        return min(d, max(1, int(self.k_fraction * d)))


# ------------------------------------------------------------------------------------------------
# validation and --optim_args parsing
# ------------------------------------------------------------------------------------------------

_CHOICES = {"variant": VARIANTS, "window_format": WINDOW_FORMATS}
_INT_MIN = {"m": 1, "rank": 1}
# (low, high, low inclusive, high inclusive)
_FLOAT_RANGE = {
    "lr": (0.0, float("inf"), True, False),
    "k_fraction": (0.0, 1.0, False, True),
    "damp": (0.0, float("inf"), False, False),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, 1.0, True, False),
}
_BOOLS = ("lr_scaled_decay",)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(name: str, value: Any) -> None:
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            allowed = ", ".join(map(repr, _CHOICES[name]))
            raise ConfigError(f"SparseMFAC: {name}={value!r} is not valid; allowed values: {allowed}.")
    elif name in _INT_MIN:
        if not _is_int(value) or value < _INT_MIN[name]:
            raise ConfigError(f"SparseMFAC: {name} must be an integer >= {_INT_MIN[name]}, got {value!r}.")
    elif name == "k":
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"SparseMFAC: k must be None (use k_fraction) or an integer >= 1, got {value!r}.")
    elif name in _FLOAT_RANGE:
        low, high, lo_inc, hi_inc = _FLOAT_RANGE[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            v = float(value)
            ok = (v >= low if lo_inc else v > low) and (v <= high if hi_inc else v < high)
        if not ok:
            span = f"{'[' if lo_inc else '('}{low:g}, {high:g}{']' if hi_inc else ')'}"
            raise ConfigError(f"SparseMFAC: {name} must be a number in {span}, got {value!r}.")
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"SparseMFAC: {name} must be true or false, got {value!r}.")
    else:  # pragma: no cover - every field must have a rule
        raise AssertionError(f"no validation rule for {name}")


def _cast(name: str, text: str) -> Any:
    low = text.strip().lower()
    if name in _BOOLS:
        if low in {"true", "1", "yes", "y", "on"}:
            return True
        if low in {"false", "0", "no", "n", "off"}:
            return False
        raise ConfigError(f"SparseMFAC: optim_args value {name}={text!r} is not true or false.")
    if name in _CHOICES:
        return low
    if name == "k" and low in {"none", ""}:
        return None
    try:
        return int(text) if name in _INT_MIN or name == "k" else float(text)
    except ValueError:
        kind = "an integer" if name in _INT_MIN or name == "k" else "a number"
        raise ConfigError(f"SparseMFAC: optim_args value {name}={text!r} is not {kind}.") from None


def parse_sparse_mfac_optim_args(text: str | None, reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse ``"m=32,k_fraction=0.01,damp=1e-6"`` (``--optim_args``) into typed SparseMFAC options.

    Unknown keys, bad values and ``reserved`` keys (which come from another flag, named in the message)
    raise :class:`~hf_q4shampoo.config.ConfigError` naming the key and the allowed keys or values.
    """
    if text is None or not text.strip():
        return {}
    out: dict[str, Any] = {}
    names = SparseMFACConfig.field_names()
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"SparseMFAC: optim_args item {item!r} is not of the form key=value.")
        key, value = item.split("=", 1)
        if reserved and key in reserved:
            raise ConfigError(f"SparseMFAC: {key!r} cannot be set in optim_args; use {reserved[key]} instead.")
        if key not in names:
            allowed = [n for n in names if not reserved or n not in reserved]
            raise ConfigError(f"SparseMFAC: unknown optim_args key {key!r}. Allowed keys: {', '.join(allowed)}.")
        out[key] = _cast(key, value)
        _validate(key, out[key])
    SparseMFACConfig._check_names(out)  # k together with k_fraction
    return out


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
    offset = 0
    for p in params:
        n = p.numel()
        if decay:
            p.mul_(1.0 - decay)
        p.add_(direction[offset : offset + n].view_as(p), alpha=-lr)
        offset += n
