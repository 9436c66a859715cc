"""4-bit AdamW of matrices in Triton kernels (``adamw4_step``; oracle: ``first_order._adamw_math``).

Per batch of K matrices of shape (R, C) (paper 3: m block-wise (128 entries in the paper; the block size is read
from the state's number of scales) dynamic-exponent, v rank-1 zero-free):

* pass A, one program per 1024 consecutive entries of one matrix: decode m and v, take the AdamW step
  (decoupled decay, bias corrections), write the parameter, re-encode m (its blocks lie inside the
  program; each block's log-grid scale index goes to a scratch buffer) and write the new v to a scratch buffer;
* ``triton_common._scale_bytes`` turns m's grid indices into its one-byte scales under each matrix's new
  exponent (``log_scales``);
* between the passes, torch reduces the scratch buffer to v's new row and column maxima (rank-1 scales, stored in
  bf16: the copy rounds them to nearest, as ``quant.quantize_rank1`` does);
* pass B re-encodes v with those scales.

With a factored v (paper 3's "4-bit Factor", Adafactor's row and column EMAs of ``d^2``) the caller has
updated the EMAs (``first_order.factored_ema``) and passes the two factors of the new v (``v_factors``); pass A
reads ``v = row_factor * col_factor`` from them, and there is no scratch buffer and no pass B.

A member whose ``keep`` flag is 0 (a skipped update, see ``first_order``) stores nothing in either pass
and keeps its v maxima, so its parameter and moments stay exactly as they were.

The arithmetic is that of ``first_order._adamw_math`` operation for operation (same rounding, nearest
code by counting the table's midpoints below the value, as ``torch.bucketize`` does), so the kernels agree
with the torch path up to the last-bit differences of division.
"""

from __future__ import annotations

import torch

from .capture_guard import refuse_in_capture
from .log_scales import grid_table
from .quant import block_size_of, get_code
from .triton_common import HAS_TRITON, tl, triton

__all__ = ["adamw4_step"]

BLOCK = 1024  # entries per program: whole blocks of m (128 to 1024 entries, read from the state), even


if HAS_TRITON:
    from .triton_common import (  # defined only where Triton is installed
        _codes_of,
        _grid_index,
        _grid_value,
        _scale_bytes,
        _scale_of,
    )

    @triton.jit(do_not_specialize_on_alignment=["m_exp_ptr"])  # rows of a stacked (K,) int32: any alignment
    def _pass_a(
        param_ptrs,
        d_ptr,
        m_codes_ptr,
        m_scales_ptr,
        m_exp_ptr,
        m_grid_j_ptr,
        v_codes_ptr,
        max0_ptr,
        max1_ptr,
        v_new_ptr,
        m_table_ptr,
        m_mids_ptr,
        grid_ptr,
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
        FACTORED: tl.constexpr,
        BLOCK: tl.constexpr,
        M_BLOCK: tl.constexpr,
    ):
        # FACTORED: max0 / max1 hold the new v's row and column factors (v_codes, v_new unused)
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
        m_byte = tl.load(m_scales_ptr + k.to(tl.int64) * NBLK + even // M_BLOCK, mask=in_e, other=0)
        m_scale = _scale_of(m_byte, tl.load(m_exp_ptr + k), grid_ptr)
        m_e = tl.load(m_table_ptr + (mbyte & 15)) * m_scale
        m_o = tl.load(m_table_ptr + (mbyte >> 4)) * m_scale
        # v's rank-1 maxima (bf16) or a factored v's row and column factors (fp32)
        row_e = tl.load(max0_ptr + k * R + even // C, mask=in_e, other=0.0).to(tl.float32)
        col_e = tl.load(max1_ptr + k * C + even % C, mask=in_e, other=0.0).to(tl.float32)
        row_o = tl.load(max0_ptr + k * R + odd // C, mask=in_o, other=0.0).to(tl.float32)
        col_o = tl.load(max1_ptr + k * C + odd % C, mask=in_o, other=0.0).to(tl.float32)
        if FACTORED:  # the new v itself, from its factors
            v_e = row_e * col_e
            v_o = row_o * col_o
        else:  # decode v (rank-1 zero-free linear, scale min(row max, column max)), then its EMA
            vbyte = tl.load(v_codes_ptr + k.to(tl.int64) * NB2 + pair, mask=in_pair, other=0).to(tl.int32)
            v_e = tl.load(v_table_ptr + (vbyte & 15)) * tl.minimum(row_e, col_e)
            v_o = tl.load(v_table_ptr + (vbyte >> 4)) * tl.minimum(row_o, col_o)
            v_e = v_e * beta2 + (1.0 - beta2) * d_e * d_e
            v_o = v_o * beta2 + (1.0 - beta2) * d_o * d_o
        # the AdamW step (lerp with weight < 0.5 is start + w (end - start), as torch computes it)
        m_e = m_e + (1.0 - beta1) * (d_e - m_e)
        m_o = m_o + (1.0 - beta1) * (d_o - m_o)
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
        if not FACTORED:
            tl.store(v_new_ptr + row_base + even, v_e, mask=in_e)
            tl.store(v_new_ptr + row_base + odd, v_o, mask=in_o)
        # re-encode m: M_BLOCK / 2 pairs per block; absmax over the block, nearest code of m / absmax
        PAIRS: tl.constexpr = M_BLOCK // 2
        NB: tl.constexpr = HALF // PAIRS
        a_e = tl.reshape(tl.where(in_e, tl.abs(m_e), 0.0), (NB, PAIRS))
        a_o = tl.reshape(tl.where(in_o, tl.abs(m_o), 0.0), (NB, PAIRS))
        grid_j = _grid_index(tl.maximum(tl.max(a_e, axis=1), tl.max(a_o, axis=1)), grid_ptr)
        absmax = _grid_value(grid_j, grid_ptr)  # the block's scale (its stored byte: _scale_bytes, after this pass)
        safe = tl.where(absmax > 0, absmax, 1.0)
        c_e = _codes_of(tl.reshape(m_e, (NB, PAIRS)) / safe[:, None], m_mids_ptr)
        c_o = _codes_of(tl.reshape(m_o, (NB, PAIRS)) / safe[:, None], m_mids_ptr)
        packed = tl.reshape(c_e | (c_o << 4), (HALF,)).to(tl.uint8)
        tl.store(m_codes_ptr + k.to(tl.int64) * NB2 + pair, packed, mask=in_pair & keep)
        blk = pid * NB + tl.arange(0, NB)
        tl.store(m_grid_j_ptr + k.to(tl.int64) * NBLK + blk, grid_j, mask=blk < NBLK)

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
            tl.load(max0_ptr + k * R + even // C, mask=in_e, other=1.0).to(tl.float32),
            tl.load(max1_ptr + k * C + even % C, mask=in_e, other=1.0).to(tl.float32),
        )
        s_o = tl.minimum(
            tl.load(max0_ptr + k * R + odd // C, mask=in_o, other=1.0).to(tl.float32),
            tl.load(max1_ptr + k * C + odd % C, mask=in_o, other=1.0).to(tl.float32),
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
        refuse_in_capture(params[0].device, "a new parameter pointer table")
        if len(_POINTERS) > 256:
            _POINTERS.clear()
        table = _POINTERS[key] = torch.tensor(key[1], dtype=torch.int64, device=params[0].device)
    return table


def pointer_tables() -> list[torch.Tensor]:
    """The cached pointer tables (a captured CUDA graph holds on to those it reads: ``step_graph.py``)."""
    return list(_POINTERS.values())


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
    v_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One 4-bit AdamW step of K matrices in place (see the module docstring). ``lr``, ``bias1`` and
    ``bias2_sqrt`` are 0-dim fp32 device tensors; the moments are the batch's stacked state; ``m_map`` is the
    code of m (any 16-entry table: the kernel reads it from memory); ``keep`` (K,) bool flags, false for
    members that must stay as they are (None: all are updated). ``v_factors``: for a factored v, the new v's row
    factor ``(K, R)`` and column factor ``(K, C)``, contiguous (``first_order.factored_ema``; its EMAs already
    stored); None: v is the rank-1 4-bit codes in ``moments``."""
    k = len(params)
    rows, cols = params[0].shape
    n = rows * cols
    device = directions.device
    m_table, m_mids = get_code(m_map, device)
    v_table, v_mids = get_code("zero_free_linear", device)
    m_codes, m_scales, m_exp = moments["exp_avg_codes"], moments["exp_avg_scales"], moments["exp_avg_scale_exp"]
    m_grid_j = torch.empty(m_scales.shape, dtype=torch.int32, device=device)  # the new m's grid indices
    directions = directions.contiguous()
    if keep is None:
        keep = torch.ones(k, dtype=torch.bool, device=device)
    keep_bytes = keep.contiguous().view(torch.uint8)
    factored = v_factors is not None
    if factored:
        row, col = v_factors
        v_codes = v_new = m_codes  # not read: pass A takes v from its factors
    else:
        v_codes = moments["exp_avg_sq_codes"]
        row, col = moments["exp_avg_sq_max0"], moments["exp_avg_sq_max1"]
        v_new = torch.empty((k, rows, cols), dtype=torch.float32, device=device)
    grid = (k, triton.cdiv(n, BLOCK))
    _pass_a[grid](
        _pointer_table(params),
        directions,
        m_codes,
        m_scales,
        m_exp,
        m_grid_j,
        v_codes,
        row,
        col,
        v_new,
        m_table,
        m_mids,
        grid_table(device),
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
        FACTORED=factored,
        BLOCK=BLOCK,
        M_BLOCK=block_size_of(n, m_scales.shape[-1]),
    )
    nblk = m_scales.shape[-1]
    _scale_bytes[(k,)](m_grid_j, m_grid_j, m_scales, m_scales, m_exp, keep_bytes, nblk, 0, KEEP=True, CHUNK=1024)
    if factored:
        return
    max0, max1 = row, col
    rows_kept = keep.reshape(k, 1)
    max0.copy_(torch.where(rows_kept, v_new.amax(dim=2), max0))
    max1.copy_(torch.where(rows_kept, v_new.amax(dim=1), max1))
    _pass_b[grid](v_new, v_codes, max0, max1, v_mids, keep_bytes, n, (n + 1) // 2, rows, cols, BLOCK=BLOCK)
