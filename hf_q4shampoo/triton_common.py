"""What the Triton kernel modules share: the optional ``triton`` import (``HAS_TRITON``), the nearest-code
search of a 4-bit table (``_codes_of``) and the one-byte log-grid block scales (``_grid_index`` / ``_grid_value``
/ ``_scale_of`` / ``_scale_bytes``: the Cholesky factor, the roots and the 4-bit AdamW's m; ``log_scales`` is their
torch oracle, bit for bit)."""

from __future__ import annotations

try:  # Triton ships with CUDA builds of torch; CPU builds have none, and nothing here is then used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = tl = None

from .log_scales import SCALE_STEPS, TOP_CODE, ZERO_INDEX

__all__ = ["HAS_TRITON"]

if SCALE_STEPS != 16:  # pragma: no cover - the kernels below shift and mask by 4 bits
    raise AssertionError("the Triton scale helpers assume 16 grid points per octave")

HAS_TRITON = triton is not None


if HAS_TRITON:
    _ZERO_INDEX = tl.constexpr(ZERO_INDEX)  # jit code reads module globals only as constexpr
    _TOP_CODE = tl.constexpr(TOP_CODE)

    @triton.jit
    def _codes_of(x, mids_ptr):
        """Index of the nearest table entry: the number of midpoints strictly below x (torch.bucketize)."""
        code = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(15):
            code += (x > tl.load(mids_ptr + i)).to(tl.int32)
        return code

    @triton.jit
    def _grid_index(x, grid_ptr):
        """int32 index of the log-grid point nearest to x (fp32, finite, >= 0): ``log_scales.grid_index`` bit for
        bit (the exponent field, then the mantissa against the 16 midpoints at ``grid_ptr + 16``)."""
        bits = x.to(tl.int32, bitcast=True)
        biased = bits >> 23
        mantissa = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        frac = tl.zeros(x.shape, dtype=tl.int32)
        for f in tl.static_range(16):
            frac += (mantissa > tl.load(grid_ptr + 16 + f)).to(tl.int32)
        j = tl.minimum((biased - 127) * 16 + frac, 127 * 16 + 15)
        return tl.where(biased > 0, j, _ZERO_INDEX)

    @triton.jit
    def _grid_value(j, grid_ptr):
        """fp32 2^(j / 16): the fraction table at ``grid_ptr`` times a power of two (``log_scales.grid_value``)."""
        octave = j >> 4
        valid = (j != _ZERO_INDEX) & (octave >= -126)
        power = ((tl.minimum(tl.maximum(octave, -126), 127) + 127) << 23).to(tl.float32, bitcast=True)
        return tl.where(valid, tl.load(grid_ptr + (j & 15)) * power, 0.0)

    @triton.jit
    def _scale_of(byte, exponent, grid_ptr):
        """The block scale of a stored byte (0: zero) under its matrix's exponent (``log_scales.decode_scales``)."""
        byte = byte.to(tl.int32)
        return tl.where(byte > 0, _grid_value(byte + exponent - _TOP_CODE, grid_ptr), 0.0)

    @triton.jit
    def _largest_index(top, j_ptr, N, CHUNK: tl.constexpr):
        """``top`` (CHUNK lanes) raised to the grid indices ``j_ptr[0:N]``. (While loops: Triton's interpreter cannot
        run a ``range`` over a run-time bound.)"""
        start = 0
        while start < N:
            at = start + tl.arange(0, CHUNK)
            top = tl.maximum(top, tl.load(j_ptr + at, mask=at < N, other=_ZERO_INDEX))
            start += CHUNK
        return top

    @triton.jit
    def _store_bytes(j_ptr, bytes_ptr, N, exponent, CHUNK: tl.constexpr):
        """``bytes_ptr[0:N]``: the stored byte of each grid index under ``exponent`` (``log_scales.encode_scales``)."""
        start = 0
        while start < N:
            at = start + tl.arange(0, CHUNK)
            j = tl.load(j_ptr + at, mask=at < N, other=_ZERO_INDEX)
            byte = j - exponent + _TOP_CODE
            tl.store(bytes_ptr + at, tl.where((j != _ZERO_INDEX) & (byte >= 1), byte, 0).to(tl.uint8), mask=at < N)
            start += CHUNK

    @triton.jit(do_not_specialize_on_alignment=["exp_ptr", "keep_ptr"])  # rows of stacked (K,) tensors
    def _scale_bytes(
        grid_j_ptr, row_j_ptr, scales_ptr, row_ptr, exp_ptr, keep_ptr, NS, ND, KEEP: tl.constexpr, CHUNK: tl.constexpr
    ):
        """One matrix per program: its exponent (the largest grid index of its ``NS`` block scales and ``ND`` more,
        e.g. the factor's per-row scales), then every scale's byte ``j - E + 255`` (0: zero, or flushed:
        ``log_scales.encode_scales``). With ``KEEP``, a member whose flag is 0 keeps its bytes and exponent."""
        k = tl.program_id(0).to(tl.int64)
        if KEEP:
            if tl.load(keep_ptr + k) == 0:
                return
        top = tl.full((CHUNK,), _ZERO_INDEX, tl.int32)
        top = _largest_index(top, grid_j_ptr + k * NS, NS, CHUNK)
        top = _largest_index(top, row_j_ptr + k * ND, ND, CHUNK)
        exponent = tl.max(top, axis=0)
        tl.store(exp_ptr + k, exponent)
        _store_bytes(grid_j_ptr + k * NS, scales_ptr + k * NS, NS, exponent, CHUNK)
        _store_bytes(row_j_ptr + k * ND, row_ptr + k * ND, ND, exponent, CHUNK)
