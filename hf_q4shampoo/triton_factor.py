"""The Cholesky forms' statistics update in Triton kernels: dequantize the stored factor (and the upper
triangle's second matrix), and re-quantize the new factor, each in one or two passes, for every factor layout
(``dequantize_factor`` / ``requantize_factor``; oracles: CholeskyForm._load_factor / _store_factor /
update_statistics' eager code)

Layouts: ``column`` divides F = offdiag(C) by C's diagonal, column by column, before quantizing
(factor_scaling="column"); the upper triangle of the code buffer holds (``upper``):
  "none"     codes of zeros (precond="cholesky": no second matrix),
  "feedback" the error-feedback state E^T (paper 1),
  "refine"   R^T, a second code of the first code's residual R = F - D(Q(F)) (the factor to ~8 bits).

Bit-identity with the torch path, on the GPU too: every division is IEEE (``tl.div_rn``; Triton's ``/``
is the approximate ``div.full.f32``, which differs in the last bit and can flip a code at a midpoint),
and the kernels are launched with ``enable_fp_fusion=False`` so that ``a * b + c`` is not contracted to a
fused multiply-add (torch runs the multiply and the add as two kernels, rounding in between). The
interpreter runs them in numpy, where neither can happen.
"""

from __future__ import annotations

import torch

from .log_scales import grid_table
from .triton_common import HAS_TRITON, tl, triton

__all__ = ["UPPER_MODES", "dequantize_factor", "requantize_factor"]

UPPER_MODES = {"none": 0, "feedback": 1, "refine": 2}
_EXACT = {"enable_fp_fusion": False}  # see the module docstring (ignored by the interpreter)

if HAS_TRITON:
    from .triton_common import (  # defined only where Triton is installed
        _codes_of,
        _grid_index,
        _grid_value,
        _scale_bytes,
        _scale_of,
    )

    @triton.jit
    def _div(x, y):
        """IEEE ``x / y`` with broadcasting (``tl.div_rn`` itself takes equal shapes only)."""
        x, y = tl.broadcast(x, y)
        return tl.div_rn(x, y)

    @triton.jit
    def _nibble(codes_ptr, row_base, j, valid):
        byte = tl.load(codes_ptr + row_base + j // 2, mask=valid, other=0).to(tl.int32)
        return tl.where(j % 2 == 0, byte & 15, byte >> 4)

    @triton.jit(do_not_specialize_on_alignment=["exp_ptr"])  # a row of a stacked (K,) int32: any alignment
    def _dequant_factor(
        codes_ptr,
        scales_ptr,
        dbus_ptr,
        exp_ptr,
        diag_ptr,
        table_ptr,
        grid_ptr,
        c_ptr,
        u_ptr,
        n,
        NB2,
        NBLK,
        QBLOCK: tl.constexpr,
        TI: tl.constexpr,
        UPPER: tl.constexpr,
        COLUMN: tl.constexpr,
    ):
        """C = (strict lower [+ refine: strict upper transposed]) [* column's diagonal] + diag; with
        feedback also U = strict upper (own scales). One block column of TI rows per program."""
        k = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * TI + tl.arange(0, TI)[:, None]
        b = tl.program_id(2)
        j = b * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        inside = (i < n) & (j < n)
        row_ok = i < n
        lower = inside & (j < i)
        code = _nibble(codes_ptr, (k * n + i) * NB2, j, inside)
        value = tl.load(table_ptr + code)
        exponent = tl.load(exp_ptr + k)
        scale = _scale_of(tl.load(scales_ptr + (k * n + i) * NBLK + b, mask=row_ok, other=0), exponent, grid_ptr)
        dbus = _scale_of(tl.load(dbus_ptr + k * n + i, mask=row_ok, other=0), exponent, grid_ptr)
        diag_block = i // QBLOCK
        lo_scale = tl.where(b <= diag_block, scale, 0.0)
        lo = value * lo_scale
        if UPPER == 2:
            # + R^T: entry (i, j < i) of the sum is R's at row j, column i of the upper triangle, whose block
            # i // QBLOCK is row j's diagonal block (own scale dbus[j]) or one right of it (scales[j, .])
            code_t = _nibble(codes_ptr, (k * n + j) * NB2, i, lower)
            t_block = i // QBLOCK
            t_byte = tl.load(scales_ptr + (k * n + j) * NBLK + t_block, mask=lower & (t_block > j // QBLOCK), other=0)
            t_scale = _scale_of(t_byte, exponent, grid_ptr)
            t_dbus = _scale_of(
                tl.load(dbus_ptr + k * n + j, mask=lower & (t_block == j // QBLOCK), other=0), exponent, grid_ptr
            )
            lo = lo + tl.load(table_ptr + code_t) * (t_scale + t_dbus)
        if COLUMN:
            lo = lo * tl.load(diag_ptr + k * n + j, mask=j < n, other=0.0)
        d = tl.load(diag_ptr + k * n + i, mask=row_ok, other=0.0)
        c = tl.where(j < i, lo, tl.where(j == i, d, 0.0))
        offset = k * n * n + i * n + j
        tl.store(c_ptr + offset, c, mask=inside)
        if UPPER == 1:
            up_scale = tl.where(b > diag_block, scale, 0.0) + tl.where(b == diag_block, dbus, 0.0)
            tl.store(u_ptr + offset, tl.where(j > i, value * up_scale, 0.0), mask=inside)

    @triton.jit
    def _requant_lower(
        new_c_ptr,
        u_old_ptr,
        lo_codes_ptr,
        err_ptr,
        grid_j_ptr,
        diag_ptr,
        table_ptr,
        mids_ptr,
        grid_ptr,
        ef_beta,
        one_minus_beta,
        n,
        NBLK,
        QBLOCK: tl.constexpr,
        TI: tl.constexpr,
        UPPER: tl.constexpr,
        COLUMN: tl.constexpr,
    ):
        """x = F (+ E with feedback); its strict lower part block-quantized (codes kept unpacked in a scratch
        buffer); the upper triangle's matrix (feedback: E' = beta E + (1 - beta)(x - D(Q(x))); refine:
        R = x - D(Q(x))) written to a scratch buffer; C's diagonal stored. Only the lower triangle is read."""
        k = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1) * TI + tl.arange(0, TI)
        i = row[:, None]
        b = tl.program_id(2)
        j = b * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        inside = (i < n) & (j < n)
        lower = inside & (j < i)
        base = k * n * n
        c = tl.load(new_c_ptr + base + i * n + j, mask=inside & (j <= i), other=0.0)
        x = c
        if COLUMN:  # F = offdiag(C) / diag(C), column by column (entries on and above the diagonal unused)
            x = _div(c, tl.load(new_c_ptr + base + j * n + j, mask=j < n, other=1.0))
        if UPPER == 1:
            e = tl.load(u_old_ptr + base + j * n + i, mask=lower, other=0.0)  # E = U^T, strictly lower
            x = x + e
        x_lower = tl.where(j < i, x, 0.0)
        lo_j = _grid_index(tl.max(tl.abs(x_lower), axis=1), grid_ptr)
        lo_max = _grid_value(lo_j, grid_ptr)  # the block's scale (its stored byte: _scale_bytes)
        safe = tl.where(lo_max > 0, lo_max, 1.0)
        code = _codes_of(_div(x_lower, safe[:, None]), mids_ptr)
        tl.store(lo_codes_ptr + base + i * n + j, code.to(tl.uint8), mask=lower)
        tl.store(grid_j_ptr + (k * n + row) * NBLK + b, lo_j, mask=row < n)
        tl.store(diag_ptr + k * n + i + 0 * j, c, mask=inside & (j == i))
        if UPPER != 0:
            residual = x_lower - tl.load(table_ptr + code) * lo_max[:, None]
            if UPPER == 1:
                residual = ef_beta * e + one_minus_beta * residual
            tl.store(err_ptr + base + i * n + j, residual, mask=lower)

    @triton.jit
    def _requant_upper(
        err_ptr,
        lo_codes_ptr,
        codes_ptr,
        grid_j_ptr,
        dbus_j_ptr,
        mids_ptr,
        grid_ptr,
        n,
        NB2,
        NBLK,
        QBLOCK: tl.constexpr,
        TI: tl.constexpr,
        UPPER: tl.constexpr,
    ):
        """The upper matrix's transpose (zeros with ``UPPER == 0``) block-quantized into the strict upper
        triangle of the same code buffer; packs both triangles' codes and writes the upper part's scales."""
        k = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1) * TI + tl.arange(0, TI)
        i = row[:, None]
        b = tl.program_id(2)
        HALF: tl.constexpr = QBLOCK // 2
        j_even = b * QBLOCK + 2 * tl.arange(0, HALF)[None, :]
        j_odd = j_even + 1
        base = k * n * n
        row_ok = i < n
        in_e = row_ok & (j_even < n)
        in_o = row_ok & (j_odd < n)
        if UPPER == 0:
            u_e = tl.zeros((TI, HALF), dtype=tl.float32)
            u_o = tl.zeros((TI, HALF), dtype=tl.float32)
        else:
            u_e = tl.load(err_ptr + base + j_even * n + i, mask=in_e & (j_even > i), other=0.0)
            u_o = tl.load(err_ptr + base + j_odd * n + i, mask=in_o & (j_odd > i), other=0.0)
        up_j = _grid_index(tl.maximum(tl.max(tl.abs(u_e), axis=1), tl.max(tl.abs(u_o), axis=1)), grid_ptr)
        up_max = _grid_value(up_j, grid_ptr)
        safe = tl.where(up_max > 0, up_max, 1.0)[:, None]
        up_e = _codes_of(_div(u_e, safe), mids_ptr)
        up_o = _codes_of(_div(u_o, safe), mids_ptr)
        lo_e = tl.load(lo_codes_ptr + base + i * n + j_even, mask=in_e & (j_even < i), other=0).to(tl.int32)
        lo_o = tl.load(lo_codes_ptr + base + i * n + j_odd, mask=in_o & (j_odd < i), other=0).to(tl.int32)
        c_e = tl.where(j_even < i, lo_e, up_e)
        c_o = tl.where(j_odd < i, lo_o, tl.where(in_o, up_o, 0))  # the pad nibble of an odd order is 0
        pair = b * HALF + tl.arange(0, HALF)[None, :]
        tl.store(codes_ptr + (k * n + i) * NB2 + pair, (c_e | (c_o << 4)).to(tl.uint8), mask=row_ok & (pair < NB2))
        diag_block = row // QBLOCK
        tl.store(grid_j_ptr + (k * n + row) * NBLK + b, up_j, mask=(row < n) & (b > diag_block))
        tl.store(dbus_j_ptr + k * n + row, up_j, mask=(row < n) & (b == diag_block))


_TI = 32  # rows per program of the factor kernels


def dequantize_factor(
    codes: torch.Tensor,
    scales: torch.Tensor,
    dbus: torch.Tensor,
    scale_exp: torch.Tensor,
    diag: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
    upper: str = "feedback",
    column: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(C, U)`` of ``quant.quantize_lower_upper``'s storage, fp32 ``(K, n, n)`` each: the Cholesky factor
    (strict lower part, times its column's diagonal entry with ``column``, + diagonal; with ``upper="refine"``
    the upper triangle's residual code is added first) and, with ``upper="feedback"``, the strict upper part
    (the error state's transpose); U is None otherwise (nothing reads it)."""
    k, n = diag.shape
    mode = UPPER_MODES[upper]
    c = torch.empty((k, n, n), dtype=torch.float32, device=diag.device)
    u = torch.empty_like(c) if mode == 1 else None
    grid = (k, triton.cdiv(n, _TI), scales.shape[-1])
    _dequant_factor[grid](
        codes,
        scales,
        dbus,
        scale_exp,
        diag,
        table,
        grid_table(diag.device),
        c,
        c if u is None else u,
        n,
        codes.shape[-1],
        scales.shape[-1],
        QBLOCK=block_size,
        TI=_TI,
        UPPER=mode,
        COLUMN=column,
        **_EXACT,
    )
    return c, u


def requantize_factor(
    new_c: torch.Tensor,
    u_old: torch.Tensor | None,
    table: torch.Tensor,
    mids: torch.Tensor,
    block_size: int,
    upper: str = "feedback",
    column: bool = False,
    ef_beta: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Store the new lower factor ``new_c``: ``F`` (``offdiag(C)``, divided by its column's diagonal entry with
    ``column``) quantized in the strict lower triangle, ``diag(C)`` in fp32, and in the upper triangle of the
    same codes, transposed: with ``upper="feedback"`` (paper 1) ``x = F + E`` is what is quantized and
    ``E' = beta E + (1 - beta)(x - D(Q(x)))`` is stored (``u_old`` is the old E's transpose, strict upper);
    with ``"refine"`` the residual ``F - D(Q(F))``; with ``"none"`` zeros.

    Returns the stored tensors under the form's keys without the ``factor_`` prefix: codes, scales,
    diag_block_upper_scale, scale_exp, diag. The scales' bytes are written last (``_scale_bytes``), once each
    factor's largest grid index is known.
    """
    k, n = new_c.shape[:2]
    mode = UPPER_MODES[upper]
    device = new_c.device
    nblk = triton.cdiv(n, block_size)
    codes = torch.empty((k, n, (n + 1) // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((k, n, nblk), dtype=torch.uint8, device=device)
    dbus = torch.empty((k, n), dtype=torch.uint8, device=device)
    scale_exp = torch.empty((k,), dtype=torch.int32, device=device)
    diag = torch.empty((k, n), dtype=torch.float32, device=device)
    grid_j = torch.empty((k, n, nblk), dtype=torch.int32, device=device)  # every block's grid index
    dbus_j = torch.empty((k, n), dtype=torch.int32, device=device)  # written by each row's diagonal-block program
    grid_values = grid_table(device)
    # scratch: unpacked lower codes, and the upper triangle's matrix before its transpose is quantized
    lo_codes = torch.empty((k, n, n), dtype=torch.uint8, device=device)
    err = torch.empty((k, n, n), dtype=torch.float32, device=device) if mode else lo_codes
    grid = (k, triton.cdiv(n, _TI), nblk)
    new_c = new_c.contiguous()
    u_old = new_c if u_old is None else u_old.contiguous()  # any pointer when unused (mode != feedback)
    _requant_lower[grid](
        new_c,
        u_old,
        lo_codes,
        err,
        grid_j,
        diag,
        table,
        mids,
        grid_values,
        ef_beta,
        1.0 - ef_beta,
        n,
        nblk,
        QBLOCK=block_size,
        TI=_TI,
        UPPER=mode,
        COLUMN=column,
        **_EXACT,
    )
    _requant_upper[grid](
        err,
        lo_codes,
        codes,
        grid_j,
        dbus_j,
        mids,
        grid_values,
        n,
        (n + 1) // 2,
        nblk,
        QBLOCK=block_size,
        TI=_TI,
        UPPER=mode,
        **_EXACT,
    )
    _scale_bytes[(k,)](grid_j, dbus_j, scales, dbus, scale_exp, scale_exp, n * nblk, n, KEEP=False, CHUNK=1024)
    return {"codes": codes, "scales": scales, "diag_block_upper_scale": dbus, "scale_exp": scale_exp, "diag": diag}
