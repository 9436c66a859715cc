"""Triton kernels for the per-step hot paths (CUDA only; the torch code they replace is their oracle).

* 4-bit AdamW of matrices in two kernels (``adamw4_step``, ``triton_adamw``; oracle: ``first_order._adamw_math``);
* decoding of 4-bit symmetric roots to full matrices (``decode_symmetric``, ``triton_roots``; oracle:
  ``quant.decode_symmetric``);
* the Cholesky forms' factor (de)quantization (``dequantize_factor`` / ``requantize_factor``, ``triton_factor``;
  oracle: ``CholeskyForm``'s eager code).

This module is their front door: it re-exports them with ``HAS_TRITON`` (``triton_common``, which also holds the
nearest-code search they share) and holds ``supports``; the rest of the code calls the kernels through it.


Why hand-written kernels instead of ``torch.compile``: the compiled math is specialised to every tensor
shape, and a model has a handful of matrix shapes, each costing a compilation of ~2 s at the first step
(30 s in all for GPT-2 small on an H200, docs/perf_notes.md v6) — longer than a short fine-tune's
optimizer work. These kernels take the shape as arguments: one compilation per kernel for any model.
"""

from __future__ import annotations

import torch

from .triton_adamw import adamw4_step, pointer_tables
from .triton_common import HAS_TRITON
from .triton_factor import dequantize_factor, requantize_factor
from .triton_roots import decode_symmetric

__all__ = [
    "HAS_TRITON",
    "supports",
    "adamw4_step",
    "pointer_tables",
    "decode_symmetric",
    "dequantize_factor",
    "requantize_factor",
]

_M_KEYS = {"exp_avg_codes", "exp_avg_scales", "exp_avg_scale_exp"}
_V_KEYS = ({"exp_avg_sq_codes", "exp_avg_sq_max0", "exp_avg_sq_max1"}, {"exp_avg_sq_row", "exp_avg_sq_col"})


def supports(params: list[torch.Tensor], directions: torch.Tensor, moments: dict[str, torch.Tensor]) -> bool:
    """Whether this batch fits the kernels: 2-D contiguous fp32/bf16 matrices with 4-bit m and a rank-1 4-bit
    or a factored v."""
    if not HAS_TRITON or directions.dim() != 3 or not any(set(moments) == _M_KEYS | v for v in _V_KEYS):
        return False
    p = params[0]
    return p.dim() == 2 and p.dtype in (torch.float32, torch.bfloat16) and all(q.is_contiguous() for q in params)
