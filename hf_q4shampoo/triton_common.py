"""What the Triton kernel modules share: the optional ``triton`` import (``HAS_TRITON``), the nearest-code
search of a 4-bit table (``_codes_of``) and the rounding of a block scale to bf16 (``_bf16_round``), used by the
4-bit AdamW and the Cholesky factor kernels."""

from __future__ import annotations

try:  # Triton ships with CUDA builds of torch; CPU builds have none, and nothing here is then used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = tl = None

__all__ = ["HAS_TRITON"]

HAS_TRITON = triton is not None


if HAS_TRITON:

    @triton.jit
    def _codes_of(x, mids_ptr):
        """Index of the nearest table entry: the number of midpoints strictly below x (torch.bucketize)."""
        code = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(15):
            code += (x > tl.load(mids_ptr + i)).to(tl.int32)
        return code

    @triton.jit
    def _bf16_round(x):
        """x (fp32, finite, non-negative) rounded to the nearest bf16 value, as fp32: ``quant.bf16_round``'s
        integer arithmetic, bit for bit."""
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).to(tl.float32, bitcast=True)
