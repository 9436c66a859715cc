"""Options of :class:`~hf_q4shampoo.sparse_mfac.SparseMFAC`: a frozen, validated dataclass and ``--optim_args`` parsing.

Same conventions as :mod:`hf_q4shampoo.config` (Q4Shampoo's): every field has a validation rule, and errors
name the bad key and the allowed keys or values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .options import ConfigError, OptionsBase, parse_bool, parse_key_values

__all__ = [
    "SparseMFACConfig",
    "parse_sparse_mfac_optim_args",
    "SPARSE_MFAC_GROUP_KEYS",
    "SPARSE_MFAC_LAYOUT_KEYS",
    "STATE_KINDS",
    "VARIANTS",
    "WINDOW_FORMATS",
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
class SparseMFACConfig(OptionsBase):
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

    OWNER = "SparseMFAC"

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
    def _check_names(cls, kwargs: dict[str, Any]) -> None:
        super()._check_names(kwargs)
        if kwargs.get("k") is not None and "k_fraction" in kwargs:
            raise ConfigError("SparseMFAC: give k (entries per group) or k_fraction (density), not both.")

    def replace(self, **kwargs: Any) -> SparseMFACConfig:
        """A copy with some fields changed (validated; unknown names are refused)."""
        self._check_names(kwargs)
        if kwargs.get("k_fraction") is not None and "k" not in kwargs:
            kwargs["k"] = None  # a new density replaces an absolute k
        return dataclasses.replace(self, **kwargs)

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
        return parse_bool(name, text, "SparseMFAC")
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
    out = parse_key_values(text, "SparseMFAC", SparseMFACConfig.field_names(), "m=32", _cast, _validate, reserved)
    SparseMFACConfig._check_names(out)  # k together with k_fraction
    return out
