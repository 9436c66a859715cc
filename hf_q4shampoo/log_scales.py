"""One byte per block scale: a point of a log2 grid, relative to an exponent per stored matrix.

The block scales of the Cholesky factor, the inverse roots and the 4-bit moments
(``quant.quantize_lower_upper`` / ``quant.quantize_symmetric`` / ``quant.quantize_log_blockwise``) are stored this
way instead of in bf16 (docs/results.md §4.8 measured the grid's quality before it was built, §4.9 after;
docs/perf_notes.md v27 counts the bytes).

* The grid: ``g(j) = 2^(j / 16)`` for integer ``j`` (16 points per octave, neighbours 4.4% apart). A block's
  absmax goes to the **nearest** point in log space (within 2.2% either way: a scale below the absmax clips
  that entry to the end code, as bf16 rounding already did within 0.39%). ``j`` is found from the fp32 bit
  pattern (exponent, then 16 comparisons of the mantissa with ``2^((f + 1/2) / 16)``) and ``g(j)`` is
  ``2^(j >> 4)`` times a 16-entry table, so the torch code here and the Triton kernels
  (``triton_common._grid_index`` / ``_grid_value``) give the same bits without calling ``log2`` or ``exp2``.
* The stored byte: ``k = j - E + 255`` with ``E`` the largest ``j`` of the matrix (``*_scale_exp``, int32,
  one per matrix), so every matrix keeps 255 grid points (16 octaves) below its largest block. ``k = 0`` is an
  exact zero scale: an all-zero block, and a block more than 254 points (~16 octaves, a factor 6e4) below
  its matrix's largest one, which is **stored as zero** (its codes are made with its own grid scale, so
  whatever was computed from them while the scale was still exact, a refinement's or an error feedback's
  residual, is that of the unflushed block).
* Zero and subnormal absmaxes give ``j = ZERO_INDEX``; an absmax at or above 2^127 is clamped to the last
  finite grid point.
"""

from __future__ import annotations

import torch

from .capture_guard import refuse_in_capture

__all__ = [
    "SCALE_STEPS",
    "TOP_CODE",
    "ZERO_INDEX",
    "grid_index",
    "grid_value",
    "matrix_exponent",
    "encode_scales",
    "decode_scales",
    "fraction_table",
    "grid_table",
    "mantissa_thresholds",
]

SCALE_STEPS = 16  # grid points per octave
TOP_CODE = 255  # the stored byte of a matrix's largest block
ZERO_INDEX = -(2**15)  # grid index of a zero (or subnormal) absmax
_MAX_INDEX = 127 * SCALE_STEPS + SCALE_STEPS - 1  # the last grid point below 2^128


def _fractions() -> torch.Tensor:
    """``2^(f / 16)``, f = 0..15, rounded once from fp64 to fp32 (the table both paths multiply by)."""
    return (2.0 ** (torch.arange(SCALE_STEPS, dtype=torch.float64) / SCALE_STEPS)).float()


def _thresholds() -> torch.Tensor:
    """``2^((f + 1/2) / 16)``, f = 0..15: a mantissa above the f-th is nearer (in log space) to point f + 1."""
    return (2.0 ** ((torch.arange(SCALE_STEPS, dtype=torch.float64) + 0.5) / SCALE_STEPS)).float()


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}
_BUILDERS = {
    "fraction": _fractions,
    "threshold": _thresholds,
    "grid": lambda: torch.cat([_fractions(), _thresholds()]),
}


def _table(name: str, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    key = (name, device)
    if key not in _TABLES:
        refuse_in_capture(device, f"the scale grid's {name} table copied from host memory")
        _TABLES[key] = _BUILDERS[name]().to(device)
    return _TABLES[key]


def fraction_table(device: torch.device | str) -> torch.Tensor:
    """The 16 fp32 values ``2^(f / 16)`` on ``device`` (cached; the Triton kernels read it)."""
    return _table("fraction", device)


def mantissa_thresholds(device: torch.device | str) -> torch.Tensor:
    """The 16 fp32 midpoints ``2^((f + 1/2) / 16)`` on ``device`` (cached)."""
    return _table("threshold", device)


def grid_table(device: torch.device | str) -> torch.Tensor:
    """The 32 fp32 values the Triton kernels read: :func:`fraction_table`, then :func:`mantissa_thresholds`."""
    return _table("grid", device)


def grid_index(x: torch.Tensor) -> torch.Tensor:
    """int32 ``j`` of the grid point nearest (in log space) to each ``x`` (fp32, finite, non-negative)."""
    bits = x.float().contiguous().view(torch.int32)
    biased = bits >> 23
    mantissa = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # x / 2^exponent, in [1, 2)
    frac = torch.bucketize(mantissa, mantissa_thresholds(x.device), out_int32=True)  # thresholds below it
    j = ((biased - 127) * SCALE_STEPS + frac).clamp_max(_MAX_INDEX)
    return torch.where(biased > 0, j, torch.full_like(j, ZERO_INDEX))


def grid_value(j: torch.Tensor, fractions: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``2^(j / 16)`` of int32 grid indices, exactly as the table and a power of two give it; 0 at
    ``ZERO_INDEX``. Indices below 2^-126 (only a flushed block's) give 0 too. ``fractions``: the
    :func:`fraction_table` on ``j``'s device (passed in by compiled callers, which must not look it up)."""
    if fractions is None:
        fractions = fraction_table(j.device)
    octave = j >> 4  # floor division, also for negative j
    valid = (j != ZERO_INDEX) & (octave >= -126)
    power = ((octave.clamp(-126, 127) + 127) << 23).view(torch.float32)
    value = fractions[(j & (SCALE_STEPS - 1)).long()] * power
    return torch.where(valid, value, torch.zeros_like(value))


def matrix_exponent(j: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """int32 ``E``: the largest grid index over the last ``dims`` dimensions (``ZERO_INDEX`` for all zeros)."""
    return j.flatten(-dims).amax(-1) if j.shape[-1] else j.new_full(j.shape[:-dims], ZERO_INDEX)


def _expand(e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return e.reshape(*e.shape, *([1] * (like.dim() - e.dim())))


def encode_scales(j: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """uint8 stored bytes ``k = j - E + 255`` (0: zero, or more than 254 points below ``E``; module docstring).
    ``exponent`` has the shape of ``j`` without its last dims (one per matrix)."""
    k = j - _expand(exponent, j) + TOP_CODE
    keep = (j != ZERO_INDEX) & (k >= 1)
    return torch.where(keep, k, torch.zeros_like(k)).to(torch.uint8)


def decode_scales(k: torch.Tensor, exponent: torch.Tensor, fractions: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 block scales of stored bytes ``k`` and their matrices' exponents (``fractions``: as
    :func:`grid_value`)."""
    k32 = k.to(torch.int32)
    value = grid_value(k32 + _expand(exponent, k32) - TOP_CODE, fractions)
    return torch.where(k32 > 0, value, torch.zeros_like(value))
