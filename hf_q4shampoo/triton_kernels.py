"""Triton kernels for the per-step hot paths (CUDA only; the torch code they replace is their oracle).

* 4-bit AdamW of matrices in two kernels (``adamw4_step``; oracle: ``first_order._adamw_math``);
* decoding of 4-bit symmetric roots to full matrices (``decode_symmetric``; oracle: ``quant.decode_symmetric``).


Why hand-written kernels instead of ``torch.compile``: the compiled math is specialised to every tensor
shape, and a model has a handful of matrix shapes, each costing a compilation of ~2 s at the first step
(30 s in all for GPT-2 small on an H200, docs/perf_notes.md v6) — longer than a short fine-tune's
optimizer work. These kernels take the shape as arguments: one compilation per kernel for any model.

Per batch of K matrices of shape (R, C) (paper 3: m block-128 dynamic-exponent, v rank-1 zero-free):

* pass A, one program per 1024 consecutive entries of one matrix: decode m and v, take the AdamW step
  (decoupled decay, bias corrections), write the parameter, re-encode m (its 128-blocks lie inside the
  program) and write the new v to a scratch buffer;
* between the passes, torch reduces the scratch buffer to v's new row and column maxima (rank-1 scales);
* pass B re-encodes v with those scales.

A member whose ``keep`` flag is 0 (a skipped update, see ``first_order``) stores nothing in either pass
and keeps its v maxima, so its parameter and moments stay exactly as they were.

The arithmetic is that of ``first_order._adamw_math`` operation for operation (same rounding, nearest
code by counting the table's midpoints below the value, as ``torch.bucketize`` does), so the kernels agree
with the torch path up to the last-bit differences of division.
"""

from __future__ import annotations

import torch

from .quant import get_code

try:  # Triton ships with CUDA builds of torch; CPU builds have none, and nothing here is then used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None

__all__ = ["HAS_TRITON", "supports", "adamw4_step", "decode_symmetric", "dequantize_factor", "requantize_factor"]

HAS_TRITON = triton is not None
BLOCK = 1024  # entries per program: 8 blocks of m, even
M_BLOCK = 128
_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_max0", "exp_avg_sq_max1")


def supports(params: list[torch.Tensor], directions: torch.Tensor, moments: dict[str, torch.Tensor]) -> bool:
    """Whether this batch fits the kernels: 2-D contiguous fp32/bf16 matrices with rank-1 4-bit v."""
    if not HAS_TRITON or directions.dim() != 3 or set(moments) != set(_KEYS):
        return False
    p = params[0]
    return p.dim() == 2 and p.dtype in (torch.float32, torch.bfloat16) and all(q.is_contiguous() for q in params)


if HAS_TRITON:

    @triton.jit
    def _codes_of(x, mids_ptr):
        """Index of the nearest table entry: the number of midpoints strictly below x (torch.bucketize)."""
        code = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(15):
            code += (x > tl.load(mids_ptr + i)).to(tl.int32)
        return code

    @triton.jit
    def _pass_a(
        param_ptrs,
        d_ptr,
        m_codes_ptr,
        m_scales_ptr,
        v_codes_ptr,
        max0_ptr,
        max1_ptr,
        v_new_ptr,
        m_table_ptr,
        m_mids_ptr,
        v_table_ptr,
        lr_ptr,
        bias1_ptr,
        bias2_ptr,
        keep_ptr,
        beta1,
        beta2,
        eps,
        weight_decay,
        N,
        NB2,
        NBLK,
        R,
        C,
        PARAM_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        k = tl.program_id(0)
        pid = tl.program_id(1)
        HALF: tl.constexpr = BLOCK // 2
        pair = pid * HALF + tl.arange(0, HALF)
        even = pair * 2
        odd = even + 1
        keep = tl.load(keep_ptr + k) != 0  # a skipped member stores nothing (its loads still run: masks only)
        in_e = even < N
        in_o = odd < N
        in_pair = pair < NB2
        row_base = k.to(tl.int64) * N
        if PARAM_BF16:
            p_ptr = tl.load(param_ptrs + k).to(tl.pointer_type(tl.bfloat16))
        else:
            p_ptr = tl.load(param_ptrs + k).to(tl.pointer_type(tl.float32))
        lr = tl.load(lr_ptr)
        bias1 = tl.load(bias1_ptr)
        bias2 = tl.load(bias2_ptr)

        d_e = tl.load(d_ptr + row_base + even, mask=in_e, other=0.0)
        d_o = tl.load(d_ptr + row_base + odd, mask=in_o, other=0.0)
        # decode m (block-128, the m_map table)
        mbyte = tl.load(m_codes_ptr + k.to(tl.int64) * NB2 + pair, mask=in_pair, other=0).to(tl.int32)
        m_scale = tl.load(m_scales_ptr + k.to(tl.int64) * NBLK + even // 128, mask=in_e, other=0.0)
        m_e = tl.load(m_table_ptr + (mbyte & 15)) * m_scale
        m_o = tl.load(m_table_ptr + (mbyte >> 4)) * m_scale
        # decode v (rank-1 zero-free linear): scale min(row max, column max)
        vbyte = tl.load(v_codes_ptr + k.to(tl.int64) * NB2 + pair, mask=in_pair, other=0).to(tl.int32)
        s_e = tl.minimum(
            tl.load(max0_ptr + k * R + even // C, mask=in_e, other=0.0),
            tl.load(max1_ptr + k * C + even % C, mask=in_e, other=0.0),
        )
        s_o = tl.minimum(
            tl.load(max0_ptr + k * R + odd // C, mask=in_o, other=0.0),
            tl.load(max1_ptr + k * C + odd % C, mask=in_o, other=0.0),
        )
        v_e = tl.load(v_table_ptr + (vbyte & 15)) * s_e
        v_o = tl.load(v_table_ptr + (vbyte >> 4)) * s_o
        # the AdamW step (lerp with weight < 0.5 is start + w (end - start), as torch computes it)
        m_e = m_e + (1.0 - beta1) * (d_e - m_e)
        m_o = m_o + (1.0 - beta1) * (d_o - m_o)
        v_e = v_e * beta2 + (1.0 - beta2) * d_e * d_e
        v_o = v_o * beta2 + (1.0 - beta2) * d_o * d_o
        u_e = (m_e / bias1) / (tl.sqrt_rn(v_e) / bias2 + eps) * lr
        u_o = (m_o / bias1) / (tl.sqrt_rn(v_o) / bias2 + eps) * lr
        decay = 1.0 - lr * weight_decay
        p_e = tl.load(p_ptr + even, mask=in_e, other=0.0)
        p_o = tl.load(p_ptr + odd, mask=in_o, other=0.0)
        if PARAM_BF16:  # as torch: decay rounded to bf16, then the update rounded to bf16 and subtracted
            p_e = (p_e.to(tl.float32) * decay).to(tl.bfloat16)
            p_o = (p_o.to(tl.float32) * decay).to(tl.bfloat16)
            p_e = (p_e.to(tl.float32) - u_e.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
            p_o = (p_o.to(tl.float32) - u_o.to(tl.bfloat16).to(tl.float32)).to(tl.bfloat16)
        else:
            p_e = p_e * decay - u_e
            p_o = p_o * decay - u_o
        tl.store(p_ptr + even, p_e, mask=in_e & keep)
        tl.store(p_ptr + odd, p_o, mask=in_o & keep)
        tl.store(v_new_ptr + row_base + even, v_e, mask=in_e)
        tl.store(v_new_ptr + row_base + odd, v_o, mask=in_o)
        # re-encode m: 64 pairs per 128-block; absmax over the block, nearest code of m / absmax
        NB: tl.constexpr = HALF // 64
        a_e = tl.reshape(tl.where(in_e, tl.abs(m_e), 0.0), (NB, 64))
        a_o = tl.reshape(tl.where(in_o, tl.abs(m_o), 0.0), (NB, 64))
        absmax = tl.maximum(tl.max(a_e, axis=1), tl.max(a_o, axis=1))
        safe = tl.where(absmax > 0, absmax, 1.0)
        c_e = _codes_of(tl.reshape(m_e, (NB, 64)) / safe[:, None], m_mids_ptr)
        c_o = _codes_of(tl.reshape(m_o, (NB, 64)) / safe[:, None], m_mids_ptr)
        packed = tl.reshape(c_e | (c_o << 4), (HALF,)).to(tl.uint8)
        tl.store(m_codes_ptr + k.to(tl.int64) * NB2 + pair, packed, mask=in_pair & keep)
        blk = pid * NB + tl.arange(0, NB)
        tl.store(m_scales_ptr + k.to(tl.int64) * NBLK + blk, absmax, mask=(blk < NBLK) & keep)

    @triton.jit
    def _pass_b(v_new_ptr, v_codes_ptr, max0_ptr, max1_ptr, v_mids_ptr, keep_ptr, N, NB2, R, C, BLOCK: tl.constexpr):
        k = tl.program_id(0)
        pid = tl.program_id(1)
        keep = tl.load(keep_ptr + k) != 0
        HALF: tl.constexpr = BLOCK // 2
        pair = pid * HALF + tl.arange(0, HALF)
        even = pair * 2
        odd = even + 1
        in_e = even < N
        in_o = odd < N
        row_base = k.to(tl.int64) * N
        v_e = tl.load(v_new_ptr + row_base + even, mask=in_e, other=0.0)
        v_o = tl.load(v_new_ptr + row_base + odd, mask=in_o, other=0.0)
        s_e = tl.minimum(
            tl.load(max0_ptr + k * R + even // C, mask=in_e, other=1.0),
            tl.load(max1_ptr + k * C + even % C, mask=in_e, other=1.0),
        )
        s_o = tl.minimum(
            tl.load(max0_ptr + k * R + odd // C, mask=in_o, other=1.0),
            tl.load(max1_ptr + k * C + odd % C, mask=in_o, other=1.0),
        )
        c_e = _codes_of(v_e / tl.where(s_e > 0, s_e, 1.0), v_mids_ptr)
        c_o = _codes_of(v_o / tl.where(s_o > 0, s_o, 1.0), v_mids_ptr)
        tl.store(v_codes_ptr + k.to(tl.int64) * NB2 + pair, (c_e | (c_o << 4)).to(tl.uint8), mask=(pair < NB2) & keep)


_POINTERS: dict[tuple, torch.Tensor] = {}


def _pointer_table(params: list[torch.Tensor]) -> torch.Tensor:
    """Device int64 table of the parameters' addresses, built once per set of addresses (building it copies
    from host memory, which would make the host wait for the stream every step)."""
    key = (params[0].device, tuple(p.data_ptr() for p in params))
    table = _POINTERS.get(key)
    if table is None:
        if len(_POINTERS) > 256:
            _POINTERS.clear()
        table = _POINTERS[key] = torch.tensor(key[1], dtype=torch.int64, device=params[0].device)
    return table


def adamw4_step(
    params: list[torch.Tensor],
    directions: torch.Tensor,
    moments: dict[str, torch.Tensor],
    lr: torch.Tensor,
    bias1: torch.Tensor,
    bias2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
) -> None:
    """One 4-bit AdamW step of K matrices in place (see the module docstring). ``lr``, ``bias1`` and
    ``bias2_sqrt`` are 0-dim fp32 device tensors; the moments are the batch's stacked state; ``m_map`` is the
    code of m (any 16-entry table: the kernel reads it from memory); ``keep`` (K,) bool flags, false for
    members that must stay as they are (None: all are updated)."""
    k = len(params)
    rows, cols = params[0].shape
    n = rows * cols
    device = directions.device
    m_table, m_mids = get_code(m_map, device)
    v_table, v_mids = get_code("zero_free_linear", device)
    m_codes, m_scales = moments["exp_avg_codes"], moments["exp_avg_scales"]
    v_codes = moments["exp_avg_sq_codes"]
    max0, max1 = moments["exp_avg_sq_max0"], moments["exp_avg_sq_max1"]
    if keep is None:
        keep = torch.ones(k, dtype=torch.bool, device=device)
    keep_bytes = keep.contiguous().view(torch.uint8)
    v_new = torch.empty((k, rows, cols), dtype=torch.float32, device=device)
    grid = (k, triton.cdiv(n, BLOCK))
    _pass_a[grid](
        _pointer_table(params),
        directions.contiguous(),
        m_codes,
        m_scales,
        v_codes,
        max0,
        max1,
        v_new,
        m_table,
        m_mids,
        v_table,
        lr,
        bias1,
        bias2_sqrt,
        keep_bytes,
        beta1,
        beta2,
        eps,
        weight_decay,
        n,
        (n + 1) // 2,
        m_scales.shape[-1],
        rows,
        cols,
        PARAM_BF16=params[0].dtype == torch.bfloat16,
        BLOCK=BLOCK,
    )
    rows_kept = keep.reshape(k, 1)
    max0.copy_(torch.where(rows_kept, v_new.amax(dim=2), max0))
    max1.copy_(torch.where(rows_kept, v_new.amax(dim=1), max1))
    _pass_b[grid](v_new, v_codes, max0, max1, v_mids, keep_bytes, n, (n + 1) // 2, rows, cols, BLOCK=BLOCK)


# ------------------------------------------------------------------------------------------------------
# 4-bit symmetric roots (quant.quantize_symmetric's packed lower triangle) decoded to full matrices
# ------------------------------------------------------------------------------------------------------

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
        scale = tl.load(scales_ptr + (base + r) * NBLK + c // QBLOCK, mask=inside & off, other=0.0)
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


# ------------------------------------------------------------------------------------------------------
# The Cholesky forms' statistics update: dequantize the stored factor (and the upper triangle's second
# matrix), and re-quantize the new factor, each in one or two passes, for every factor layout
# (oracles: CholeskyForm._load_factor / _store_factor / update_statistics' eager code)
#
# Layouts: ``column`` divides F = offdiag(C) by C's diagonal, column by column, before quantizing
# (factor_scaling="column"); the upper triangle of the code buffer holds (``upper``):
#   "none"     codes of zeros (precond="cholesky": no second matrix),
#   "feedback" the error-feedback state E^T (paper 1),
#   "refine"   R^T, a second code of the first code's residual R = F - D(Q(F)) (the factor to ~8 bits).
#
# Bit-identity with the torch path, on the GPU too: every division is IEEE (``tl.div_rn``; Triton's ``/``
# is the approximate ``div.full.f32``, which differs in the last bit and can flip a code at a midpoint),
# and the kernels are launched with ``enable_fp_fusion=False`` so that ``a * b + c`` is not contracted to a
# fused multiply-add (torch runs the multiply and the add as two kernels, rounding in between). The
# interpreter runs them in numpy, where neither can happen.
# ------------------------------------------------------------------------------------------------------

UPPER_MODES = {"none": 0, "feedback": 1, "refine": 2}
_EXACT = {"enable_fp_fusion": False}  # see the section comment above (ignored by the interpreter)

if HAS_TRITON:

    @triton.jit
    def _div(x, y):
        """IEEE ``x / y`` with broadcasting (``tl.div_rn`` itself takes equal shapes only)."""
        x, y = tl.broadcast(x, y)
        return tl.div_rn(x, y)

    @triton.jit
    def _nibble(codes_ptr, row_base, j, valid):
        byte = tl.load(codes_ptr + row_base + j // 2, mask=valid, other=0).to(tl.int32)
        return tl.where(j % 2 == 0, byte & 15, byte >> 4)

    @triton.jit
    def _dequant_factor(
        codes_ptr,
        scales_ptr,
        dbus_ptr,
        diag_ptr,
        table_ptr,
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
        scale = tl.load(scales_ptr + (k * n + i) * NBLK + b, mask=row_ok, other=0.0)
        dbus = tl.load(dbus_ptr + k * n + i, mask=row_ok, other=0.0)
        diag_block = i // QBLOCK
        lo_scale = tl.where(b <= diag_block, scale, 0.0)
        lo = value * lo_scale
        if UPPER == 2:
            # + R^T: entry (i, j < i) of the sum is R's at row j, column i of the upper triangle, whose block
            # i // QBLOCK is row j's diagonal block (own scale dbus[j]) or one right of it (scales[j, .])
            code_t = _nibble(codes_ptr, (k * n + j) * NB2, i, lower)
            t_block = i // QBLOCK
            t_scale = tl.load(
                scales_ptr + (k * n + j) * NBLK + t_block, mask=lower & (t_block > j // QBLOCK), other=0.0
            )
            t_dbus = tl.load(dbus_ptr + k * n + j, mask=lower & (t_block == j // QBLOCK), other=0.0)
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
        scales_ptr,
        diag_ptr,
        table_ptr,
        mids_ptr,
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
        lo_max = tl.max(tl.abs(x_lower), axis=1)
        safe = tl.where(lo_max > 0, lo_max, 1.0)
        code = _codes_of(_div(x_lower, safe[:, None]), mids_ptr)
        tl.store(lo_codes_ptr + base + i * n + j, code.to(tl.uint8), mask=lower)
        tl.store(scales_ptr + (k * n + row) * NBLK + b, lo_max, mask=row < n)
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
        scales_ptr,
        dbus_ptr,
        mids_ptr,
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
        up_max = tl.maximum(tl.max(tl.abs(u_e), axis=1), tl.max(tl.abs(u_o), axis=1))
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
        tl.store(scales_ptr + (k * n + row) * NBLK + b, up_max, mask=(row < n) & (b > diag_block))
        tl.store(dbus_ptr + k * n + row, up_max, mask=(row < n) & (b == diag_block))


_TI = 32  # rows per program of the factor kernels


def dequantize_factor(
    codes: torch.Tensor,
    scales: torch.Tensor,
    dbus: torch.Tensor,
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
        diag,
        table,
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
    diag_block_upper_scale, diag.
    """
    k, n = new_c.shape[:2]
    mode = UPPER_MODES[upper]
    device = new_c.device
    nblk = triton.cdiv(n, block_size)
    codes = torch.empty((k, n, (n + 1) // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((k, n, nblk), dtype=torch.float32, device=device)
    dbus = torch.zeros((k, n), dtype=torch.float32, device=device)
    diag = torch.empty((k, n), dtype=torch.float32, device=device)
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
        scales,
        diag,
        table,
        mids,
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
        err, lo_codes, codes, scales, dbus, mids, n, (n + 1) // 2, nblk, QBLOCK=block_size, TI=_TI, UPPER=mode, **_EXACT
    )
    return {"codes": codes, "scales": scales, "diag_block_upper_scale": dbus, "diag": diag}
