"""The one-byte log-grid block scales (``log_scales``) against fp64, and what storing them does to a matrix."""

import math

import torch

from hf_q4shampoo import log_scales, quant

HALF_STEP = 2.0 ** (1 / 32)  # the largest ratio between a value and its nearest grid point


def test_grid_index_is_the_nearest_point_in_log_space():
    g = torch.Generator().manual_seed(11)
    x = torch.exp2(torch.rand(20000, generator=g, dtype=torch.float64) * 200 - 120).float()
    j = log_scales.grid_index(x)
    exact = torch.log2(x.double()) * 16
    # nearest integer of 16 log2(x), except within fp32 rounding of a midpoint (none of these random values is)
    assert torch.equal(j.long(), torch.round(exact).long())
    value = log_scales.grid_value(j).double()
    assert torch.allclose(value, torch.exp2(j.double() / 16), rtol=2**-23, atol=0)  # the fp32 of 2^(j/16)
    ratio = value / x.double()
    assert float(ratio.max()) <= HALF_STEP and float(ratio.min()) >= 1 / HALF_STEP
    # a grid value's index is its own (the stored scale is a fixed point of the rounding)
    assert torch.equal(log_scales.grid_index(log_scales.grid_value(j)), j)


def test_zero_subnormal_and_huge_absmax():
    x = torch.tensor([0.0, 1e-45, 1e-39, 2.0**-126, 3e38])
    j = log_scales.grid_index(x)
    assert j[:3].tolist() == [log_scales.ZERO_INDEX] * 3  # zero and subnormals: a zero scale
    assert int(j[3]) == -126 * 16
    assert math.isfinite(float(log_scales.grid_value(j)[4])) and float(log_scales.grid_value(j)[4]) > 2.0**127
    assert float(log_scales.grid_value(j)[0]) == 0.0


def test_bytes_keep_16_octaves_below_each_matrix_and_flush_the_rest():
    g = torch.Generator().manual_seed(12)
    octaves = torch.tensor([[0.0, -3.0, -15.9, -17.0], [5.0, 5.0, -40.0, 0.0]])  # two matrices of 2 x 2 blocks
    x = torch.exp2(octaves + torch.rand(2, 4, generator=g) * 0.01).reshape(2, 2, 2)
    j = log_scales.grid_index(x)
    exponent = log_scales.matrix_exponent(j)
    k = log_scales.encode_scales(j, exponent)
    assert k.dtype == torch.uint8 and exponent.tolist() == [int(j[0].max()), int(j[1].max())]
    assert k.flatten(1).max(1).values.tolist() == [255, 255]
    decoded = log_scales.decode_scales(k, exponent)
    kept = octaves.reshape(2, 2, 2) > -16
    assert torch.equal(decoded[kept], log_scales.grid_value(j)[kept])
    assert torch.equal(decoded[~kept], torch.zeros_like(decoded[~kept]))  # more than 16 octaves down: zero


def test_symmetric_and_lower_upper_storage_against_fp64():
    g = torch.Generator().manual_seed(13)
    n = 130
    a = torch.randn(3, n, 2 * n, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 2 * n, dtype=torch.float64)
    a = a @ a.mT / (2 * n)
    q = quant.quantize_symmetric(a.float())
    assert q["scales"].dtype == torch.uint8 and q["scale_exp"].shape == (3,)
    b = quant.dequantize_symmetric(q).double()
    off = a - torch.diag_embed(a.diagonal(dim1=-2, dim2=-1))
    # as accurate as with bf16 scales, within what 2.2% scale steps add (Linear-2 on these entries: ~10%)
    with_bf16 = quant.dequantize_diagreal(quant.quantize_diagreal(a.float())).double()
    err, err_bf16 = (b - a).norm() / off.norm(), (with_bf16 - a).norm() / off.norm()
    assert float(err) < 0.15 and float(err) < 1.1 * float(err_bf16), (float(err), float(err_bf16))
    # the diagonal in fp16 over its largest entry: within half an fp16 step (2^-11 relative) of the fp64 one
    d, d_ref = b.diagonal(dim1=-2, dim2=-1), a.diagonal(dim1=-2, dim2=-1)
    assert q["diag"].dtype == torch.float16 and q["diag_scale"].shape == (3,)
    assert float(((d - d_ref).abs() / d_ref.abs()).max()) <= 2**-11 * 1.01
    assert float(((d - d_ref).abs() / d_ref.abs()).max()) > 2**-20  # not stored exactly: the bound means something
    # the second code (root_bits=8) shrinks the error ~10x
    fine = quant.dequantize_symmetric(quant.quantize_symmetric(a.float(), refine=True)).double()
    assert float((fine - a).norm() / off.norm()) < 0.2 * float(err)
    # lower / upper in one buffer: one exponent for both triangles
    c = torch.linalg.cholesky(a + 1e-3 * torch.eye(n, dtype=torch.float64))
    lower = torch.tril(c, -1).float()
    upper = (lower - torch.tril(quant.roundtrip_log_blockwise(lower), -1)).mT
    stored = quant.quantize_lower_upper(lower, upper)
    lo, up = quant.dequantize_lower_upper(stored, n)
    assert float((lo - lower).norm() / lower.norm()) < 0.15
    assert float((lo + up.mT - lower).norm() / lower.norm()) < 0.02  # refined: ~8 bits
    assert stored["diag_block_upper_scale"].dtype == torch.uint8 and stored["scale_exp"].shape == (3,)
