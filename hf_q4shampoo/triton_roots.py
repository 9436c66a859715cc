"""Triton decoder of 4-bit symmetric roots (``quant.quantize_symmetric``'s packed lower triangle) to full
matrices (``decode_symmetric``; oracle: ``quant.decode_symmetric``). With a second code of the residual
(``root_bits=8``) the same launch adds it: one read of each code, one write of the matrix. Launched without
fp-fusion, so ``a * s + b * t`` rounds as torch computes it (two products, then the sum)."""

from __future__ import annotations

import torch

from .triton_common import HAS_TRITON, tl, triton

__all__ = ["decode_symmetric"]

if HAS_TRITON:
    from .triton_common import _scale_of  # defined only where Triton is installed

    @triton.jit(do_not_specialize_on_alignment=["exp_ptr", "res_exp_ptr", "diag_scale_ptr"])  # rows of stacked (K,)
    def _decode_symmetric(
        codes_ptr,
        scales_ptr,
        exp_ptr,
        res_codes_ptr,
        res_scales_ptr,
        res_exp_ptr,
        diag_ptr,
        diag_scale_ptr,
        table_ptr,
        grid_ptr,
        out_ptr,
        n,
        NBLK,
        QBLOCK: tl.constexpr,
        OUT_BF16: tl.constexpr,
        REFINE: tl.constexpr,
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
        byte_at = (base + r) * ((n + 1) // 2) + c // 2
        scale_at = (base + r) * NBLK + c // QBLOCK
        byte = tl.load(codes_ptr + byte_at, mask=inside & off, other=0).to(tl.int32)
        code = tl.where(c % 2 == 0, byte & 15, byte >> 4)
        scale = _scale_of(tl.load(scales_ptr + scale_at, mask=inside & off, other=0), tl.load(exp_ptr + k), grid_ptr)
        value = tl.load(table_ptr + code) * scale
        if REFINE:  # the residual's code, same layout (REFINE=False never reads the two pointers)
            byte = tl.load(res_codes_ptr + byte_at, mask=inside & off, other=0).to(tl.int32)
            code = tl.where(c % 2 == 0, byte & 15, byte >> 4)
            res_exp = tl.load(res_exp_ptr + k)
            scale = _scale_of(tl.load(res_scales_ptr + scale_at, mask=inside & off, other=0), res_exp, grid_ptr)
            value = value + tl.load(table_ptr + code) * scale
        d = tl.load(diag_ptr + k.to(tl.int64) * n + i, mask=inside & (i == j), other=0.0).to(tl.float32)
        d = d * tl.load(diag_scale_ptr + k)  # fp16 diagonal over its largest entry (quant.normalised_diagonal)
        value = tl.where(off, value, d)
        dest = out_ptr + k.to(tl.int64) * n * n + i * n + j
        if OUT_BF16:
            tl.store(dest, value.to(tl.bfloat16), mask=inside)
        else:
            tl.store(dest, value, mask=inside)


def decode_symmetric(
    codes: torch.Tensor,
    scales: torch.Tensor,
    scale_exp: torch.Tensor,
    diag: torch.Tensor,
    diag_scale: torch.Tensor,
    table: torch.Tensor,
    fractions: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
    res_codes: torch.Tensor | None = None,
    res_scales: torch.Tensor | None = None,
    res_scale_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``quant.decode_symmetric``: ``(K, n, n)`` roots from their packed 4-bit storage (one-byte
    log-grid scales; ``fractions``: ``log_scales.fraction_table``), with the residual's second code added where
    given."""
    k, n = diag.shape
    out = torch.empty((k, n, n), dtype=dtype, device=diag.device)
    tile = 64
    grid = (k, triton.cdiv(n, tile), triton.cdiv(n, tile))
    refine = res_codes is not None
    codes, scales = codes.contiguous(), scales.contiguous()
    _decode_symmetric[grid](
        codes,
        scales,
        scale_exp.contiguous(),
        res_codes.contiguous() if refine else codes,
        res_scales.contiguous() if refine else scales,
        res_scale_exp.contiguous() if refine else scale_exp,
        diag.contiguous(),
        diag_scale.contiguous(),
        table,
        fractions,
        out,
        n,
        scales.shape[-1],
        QBLOCK=block_size,
        OUT_BF16=dtype == torch.bfloat16,
        REFINE=refine,
        TILE=tile,
        enable_fp_fusion=False,
    )
    return out
