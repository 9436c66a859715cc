"""Triton decoder of 4-bit symmetric roots (``quant.quantize_symmetric``'s packed lower triangle) to full
matrices (``decode_symmetric``; oracle: ``quant.decode_symmetric``)."""

from __future__ import annotations

import torch

from .triton_common import HAS_TRITON, tl, triton

__all__ = ["decode_symmetric"]

if HAS_TRITON:

    @triton.jit
    def _decode_symmetric(
        codes_ptr,
        scales_ptr,
        diag_ptr,
        table_ptr,
        out_ptr,
        n,
        NBLK,
        QBLOCK: tl.constexpr,
        OUT_BF16: tl.constexpr,
        TILE: tl.constexpr,
    ):
        k = tl.program_id(0)
        i = tl.program_id(1) * TILE + tl.arange(0, TILE)[:, None]
        j = tl.program_id(2) * TILE + tl.arange(0, TILE)[None, :]
        inside = (i < n) & (j < n)
        low_i = tl.maximum(i, j)  # the mirrored entry in the strict lower triangle
        low_j = tl.minimum(i, j)
        # packed row r holds triangle row r + 1 and then row n - 1 - r (quant._symmetric_layout_cpu)
        first = low_i <= n // 2
        r = tl.where(first, low_i - 1, n - 1 - low_i)
        c = tl.where(first, low_j, n - low_i + low_j)
        off = i != j
        half_rows = n // 2
        base = k.to(tl.int64) * half_rows
        byte = tl.load(codes_ptr + (base + r) * ((n + 1) // 2) + c // 2, mask=inside & off, other=0).to(tl.int32)
        code = tl.where(c % 2 == 0, byte & 15, byte >> 4)
        scale = tl.load(scales_ptr + (base + r) * NBLK + c // QBLOCK, mask=inside & off, other=0.0).to(tl.float32)
        value = tl.load(table_ptr + code) * scale
        d = tl.load(diag_ptr + k.to(tl.int64) * n + i, mask=inside & (i == j), other=0.0)
        value = tl.where(off, value, d)
        dest = out_ptr + k.to(tl.int64) * n * n + i * n + j
        if OUT_BF16:
            tl.store(dest, value.to(tl.bfloat16), mask=inside)
        else:
            tl.store(dest, value, mask=inside)


def decode_symmetric(
    codes: torch.Tensor,
    scales: torch.Tensor,
    diag: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Triton version of ``quant.decode_symmetric``: ``(K, n, n)`` roots from their packed 4-bit storage."""
    k, n = diag.shape
    out = torch.empty((k, n, n), dtype=dtype, device=diag.device)
    tile = 64
    grid = (k, triton.cdiv(n, tile), triton.cdiv(n, tile))
    _decode_symmetric[grid](
        codes.contiguous(),
        scales.contiguous(),
        diag.contiguous(),
        table,
        out,
        n,
        scales.shape[-1],
        QBLOCK=block_size,
        OUT_BF16=dtype == torch.bfloat16,
        TILE=tile,
    )
    return out
