"""Options of :class:`~hf_q4shampoo.q4adamw.Q4AdamW`: a frozen, validated dataclass and ``--optim_args`` parsing.

Same conventions as :mod:`hf_q4shampoo.config` (Q4Shampoo's) and :mod:`hf_q4shampoo.sparse_mfac_config`: every
field has a validation rule, and errors name the bad key and the allowed keys or values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .options import ConfigError, OptionsBase, parse_bool, parse_key_values

__all__ = [
    "Q4AdamWConfig",
    "parse_q4adamw_optim_args",
    "Q4ADAMW_GROUP_KEYS",
    "Q4ADAMW_LAYOUT_KEYS",
    "Q4ADAMW_LEGACY_LAYOUT",
    "VARIANTS",
    "M_MAPS",
]

#: ``"4bit"``: paper 3's "4-bit AdamW"; ``"factor"``: its "4-bit Factor" (Adafactor's v for matrices).
VARIANTS = ("4bit", "factor")
#: 4-bit codes of the first moment: paper 3's dynamic exponent, or paper 2's Linear-2 (``moments.py``).
M_MAPS = ("dynamic", "linear2")

#: Options that may differ between parameter groups (torch's ``defaults`` convention).
Q4ADAMW_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "maximize")

#: Options that decide the saved state's layout; resuming with other values is refused.
Q4ADAMW_LAYOUT_KEYS = ("variant", "m_map", "min_quant_numel", "min_quant_dim")
#: The value a checkpoint saved before a layout key existed implies (the layout it was saved with).
Q4ADAMW_LEGACY_LAYOUT = {"min_quant_dim": 0}


@dataclass(frozen=True)
class Q4AdamWConfig(OptionsBase):
    """Hyper-parameters of :class:`~hf_q4shampoo.Q4AdamW` (paper 3, papers.md §4).

    Step (per parameter group, torch's ``AdamW`` meaning):
        lr, betas, eps: Adam's.
        weight_decay: decoupled decay ``p <- (1 - lr wd) p`` (default 0.01, torch's ``AdamW`` default).
        maximize: ascend instead of descend (the step uses ``-grad``).

    Storage (a checkpoint made with other values is refused):
        variant: ``"4bit"`` (paper 3's 4-bit AdamW: m block-128 with ``m_map``, v rank-1 normalised with the
            zero-free linear code; 1-D v in blocks of 128) or ``"factor"`` (paper 3's 4-bit Factor: the same m,
            and v of every tensor that is a matrix after flattening its trailing dims kept as fp32 row and column
            means of ``g^2``, Adafactor's factorisation; other tensors as in ``"4bit"``).
        m_map: 4-bit code of m: ``"dynamic"`` (paper 3's dynamic exponent, the default) or ``"linear2"``
            (paper 2's Linear-2, which has both -1 and 1; Q4Shampoo's default).
        min_quant_numel: tensors with at most this many entries keep fp32 moments (paper 3 App. D.1: 4096).
        min_quant_dim: tensors that are thin, a side of at most this many entries once viewed as a matrix (the
            first dimension against the rest), keep fp32 moments too; 0 turns the rule off. Default 16: LoRA's
            adapter factors (rank r by width, width by r) are such tensors. Their 4-bit moments cost 1.8-2.3% in
            eval loss on the instruction-tuning recipe (SmolLM2-135M, LoRA r=8, four seeds, every seed worse;
            with the rule: AdamW's loss to 1e-6; README, 4-bit AdamW, with commands) and saved 5 MiB there (1.9
            against 7.0 MiB for 0.92M adapter parameters); full models have no such matrices (GPT-2 small: every
            side >= 768), so their state is unchanged (``moments.is_thin``).

    Speed:
        use_compile: on accelerators, run the step as compiled torch / Triton kernels (``first_order.py``);
            eager on CPU whatever this says.
        cuda_graph: on CUDA, replay the step's kernels (the finite checks, the gradients' gather, the 4-bit AdamW
            kernels and torch's fused AdamW of the small tensors: ~15 launches per shape group) as one captured
            CUDA graph: ``True``, ``False`` or ``"auto"`` (the default: the first ~40 steps time both ways on the
            GPU's own clock and keep the faster, ``step_graph.GraphTrial``). It saves the host's launch time, which
            is what a step costs in a loop whose GPU waits for its host (docs/perf_notes.md v25). A graphed step
            computes exactly what the eager one does (``variant="factor"``: where a shape group fits one chunk;
            under several processes it runs eagerly). Needs ``use_compile``; a tensor ``lr``, ``maximize``, more
            than one lr or step count among the groups, or gradients other than contiguous fp32 / bf16 run eagerly;
            matrices over 8M entries are stepped eagerly beside the graph. The graph's memory pool keeps the
            transients of one chunk (4M entries: ~40 MiB) between steps.
    """

    OWNER = "Q4AdamW"

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    maximize: bool = False
    variant: str = "4bit"
    m_map: str = "dynamic"
    min_quant_numel: int = 4096
    min_quant_dim: int = 16
    use_compile: bool = True
    cuda_graph: bool | str = "auto"

    def __post_init__(self) -> None:
        self._normalise_and_validate(_validate)

    def group_defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in Q4ADAMW_GROUP_KEYS}

    @property
    def first_order_v(self) -> str:
        """The second-moment mode of ``moments.py`` this variant selects."""
        return "factored" if self.variant == "factor" else "rank1"


# ------------------------------------------------------------------------------------------------
# validation and --optim_args parsing
# ------------------------------------------------------------------------------------------------

_CHOICES = {"variant": VARIANTS, "m_map": M_MAPS}
# (low, high, low inclusive, high inclusive)
_FLOAT_RANGE = {
    "lr": (0.0, float("inf"), True, False),
    "eps": (0.0, float("inf"), True, False),
    "weight_decay": (0.0, float("inf"), True, False),
}
_BOOLS = ("maximize", "use_compile")
_INTS = ("min_quant_numel", "min_quant_dim")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _validate(name: str, value: Any) -> None:
    if name in _CHOICES:
        if isinstance(value, bool) or value not in _CHOICES[name]:
            allowed = ", ".join(map(repr, _CHOICES[name]))
            raise ConfigError(f"Q4AdamW: {name}={value!r} is not valid; allowed values: {allowed}.")
    elif name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"Q4AdamW: {name} must be an integer >= 0, got {value!r}.")
    elif name in _FLOAT_RANGE:
        low, high, lo_inc, hi_inc = _FLOAT_RANGE[name]
        ok = _is_number(value)
        if ok:
            v = float(value)
            ok = (v >= low if lo_inc else v > low) and (v <= high if hi_inc else v < high)
        if not ok:
            span = f"{'[' if lo_inc else '('}{low:g}, {high:g}{']' if hi_inc else ')'}"
            raise ConfigError(f"Q4AdamW: {name} must be a number in {span}, got {value!r}.")
    elif name == "betas":
        ok = isinstance(value, tuple) and len(value) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in value)
        if not ok:
            raise ConfigError(f"Q4AdamW: betas must be two numbers in [0, 1), got {value!r}.")
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"Q4AdamW: {name} must be true or false, got {value!r}.")
    elif name == "cuda_graph":
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f'Q4AdamW: cuda_graph must be true, false or "auto", got {value!r}.')
    else:  # pragma: no cover - every field must have a rule
        raise AssertionError(f"no validation rule for {name}")


def _cast(name: str, text: str) -> Any:
    low = text.strip().lower()
    if name in _BOOLS:
        return parse_bool(name, text, "Q4AdamW")
    if name == "cuda_graph":
        if low == "auto":
            return "auto"
        try:
            return parse_bool(name, text, "Q4AdamW")
        except ConfigError:
            raise ConfigError(f'Q4AdamW: optim_args value cuda_graph={text!r} is not true, false or "auto".') from None
    if name in _CHOICES:
        return low
    try:
        if name in _INTS:
            return int(text)
        if name == "betas":  # "b1:b2", as Q4Shampoo's optim_args write it
            return tuple(float(p) for p in text.replace(";", ":").split(":"))
        return float(text)
    except ValueError:
        kind = "an integer" if name in _INTS else {"betas": "two numbers written as b1:b2"}.get(name, "a number")
        raise ConfigError(f"Q4AdamW: optim_args value {name}={text!r} is not {kind}.") from None


def parse_q4adamw_optim_args(text: str | None, reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse ``"variant=factor,min_quant_numel=4096"`` (``--optim_args``) into typed Q4AdamW options.

    Unknown keys, bad values and ``reserved`` keys (which come from another flag, named in the message)
    raise :class:`~hf_q4shampoo.config.ConfigError` naming the key and the allowed keys or values.
    """
    out = parse_key_values(text, "Q4AdamW", Q4AdamWConfig.field_names(), "variant=factor", _cast, _validate, reserved)
    return out
