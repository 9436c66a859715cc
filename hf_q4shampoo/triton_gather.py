"""Stack same-shape tensors given by their addresses into one fp32 ``(K, *shape)`` tensor (one Triton kernel).

Why: a CUDA graph of the step's update (``step_graph.py``) must not bake in the gradients' addresses, because a
training loop that zeroes gradients with ``set_to_none=True`` gets new ones every step. The graph instead reads a
device table of addresses that is refilled before each replay, and this kernel gathers the gradients through it:
the same values ``torch.stack(grads).float()`` gives (the oracle; fp32 and bf16 sources, contiguous).
"""

from __future__ import annotations

import torch

from .triton_common import HAS_TRITON, tl, triton

__all__ = ["stack_by_address", "SOURCE_DTYPES"]

SOURCE_DTYPES = (torch.float32, torch.bfloat16)
BLOCK = 2048

if HAS_TRITON:

    @triton.jit
    def _gather(table_ptr, out_ptr, N, SRC_BF16: tl.constexpr, BLOCK: tl.constexpr):
        k = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        if SRC_BF16:
            src = tl.load(table_ptr + k).to(tl.pointer_type(tl.bfloat16))
        else:
            src = tl.load(table_ptr + k).to(tl.pointer_type(tl.float32))
        x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + k.to(tl.int64) * N + offs, x, mask=mask)


def stack_by_address(table: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``(len(table), *shape)`` fp32: the contiguous ``dtype`` tensors whose addresses ``table`` (int64, on the
    device) holds, converted and stacked."""
    if dtype not in SOURCE_DTYPES:
        raise ValueError(f"stack_by_address: dtype must be one of {SOURCE_DTYPES}, got {dtype}")
    k = table.shape[0]
    n = 1
    for d in shape:
        n *= d
    out = torch.empty((k, *shape), dtype=torch.float32, device=table.device)
    _gather[(k, triton.cdiv(n, BLOCK))](table, out, n, SRC_BF16=dtype == torch.bfloat16, BLOCK=BLOCK)
    return out
