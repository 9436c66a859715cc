import pytest
import torch

from hf_q4shampoo import quant

# Tables printed in papers.md (§3.1 paper 2 App. C; §4.2 paper 3), 4 decimals.
LINEAR2_4BIT = [
    -1.0,
    -0.7511,
    -0.5378,
    -0.3600,
    -0.2178,
    -0.1111,
    -0.0400,
    0.0,
    0.0044,
    0.0400,
    0.1111,
    0.2178,
    0.3600,
    0.5378,
    0.7511,
    1.0,
]
DT_4BIT = [
    -0.8875,
    -0.6625,
    -0.4375,
    -0.2125,
    -0.0775,
    -0.0325,
    -0.0055,
    0.0,
    0.0055,
    0.0325,
    0.0775,
    0.2125,
    0.4375,
    0.6625,
    0.8875,
    1.0,
]
LINEAR2_3BIT = [-1, -0.5102, -0.1837, 0, 0.0204, 0.1837, 0.5102, 1]
DT_3BIT = [-0.775, -0.325, -0.055, 0, 0.055, 0.325, 0.775, 1]
ZERO_FREE_4BIT = [k / 16 for k in range(1, 17)]


def test_code_tables_match_papers():
    torch.testing.assert_close(quant.linear2_code(4), torch.tensor(LINEAR2_4BIT), atol=5e-5, rtol=0)
    torch.testing.assert_close(quant.dynamic_code(4), torch.tensor(DT_4BIT), atol=5e-5, rtol=0)
    torch.testing.assert_close(
        quant.linear2_code(3), torch.tensor(LINEAR2_3BIT, dtype=torch.float32), atol=5e-5, rtol=0
    )
    torch.testing.assert_close(quant.dynamic_code(3), torch.tensor(DT_3BIT, dtype=torch.float32), atol=5e-5, rtol=0)
    assert quant.zero_free_linear_code(4).tolist() == ZERO_FREE_4BIT
    # Linear-2 is asymmetric (forced zero at index 7); DT has no -1.
    assert quant.linear2_code(4)[7] == 0 and quant.linear2_code(4)[8] > 0
    assert quant.dynamic_code(4).min() > -1


@pytest.mark.parametrize("code", ["linear2", "dynamic"])
def test_nearest_rounding(code):
    table, _ = quant.get_code(code)
    x = torch.rand(4000) * 2 - 1
    idx, absmax = quant.encode_blockwise(x.unsqueeze(0), code, block_size=4000)
    normed = x / absmax[0, 0]
    brute = (normed.unsqueeze(-1) - table).abs().argmin(-1)
    # equal, except where two table entries are (numerically) equally near
    d_chosen = (normed - table[idx[0].long()]).abs()
    d_best = (normed - table[brute]).abs()
    torch.testing.assert_close(d_chosen, d_best, atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape", [(7, 5), (3, 64), (2, 3, 129), (1, 1), (5, 200), (33, 1001)])
@pytest.mark.parametrize("code", ["linear2", "dynamic"])
def test_blockwise_roundtrip_error_bound(shape, code):
    g = torch.Generator().manual_seed(hash((shape, code)) % 2**31)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-1])  # varied scales inside rows
    packed, scales = quant.quantize_blockwise(x, code, 64)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], (shape[-1] + 1) // 2)
    assert scales.shape == (*shape[:-1], -(-shape[-1] // 64))
    y = quant.dequantize_blockwise(packed, scales, shape[-1], code, 64)
    table, _ = quant.get_code(code)
    max_half_gap = float((table[1:] - table[:-1]).max() / 2)
    # |x - D(Q(x))| <= (largest half-gap of the table) * block absmax, element-wise
    # (the bf16 scale may lie 2^-8 below the block's largest entry, which then decodes to the scale: inside the bound)
    block_max = scales.float().repeat_interleave(64, -1)[..., : shape[-1]]
    bound = max_half_gap * block_max + 1e-6 * block_max
    if code == "dynamic":  # no -1 in the table: values near -absmax round to -0.8875
        bound = torch.maximum(bound, (1 + 2**-8 - 0.8875) * block_max + 1e-6)
    assert torch.all((x - y).abs() <= bound)
    # the block maximum decodes to its bf16 scale for Linear-2 (±1 are codes): within 2^-8 of itself, and exactly
    # the bf16 rounding of it (the scales are stored in bf16, rounded to nearest before the block is divided)
    assert scales.dtype == torch.bfloat16
    if code == "linear2":
        flat_x, flat_y = x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1])
        for row in range(flat_x.shape[0]):
            j = flat_x[row, :64].abs().argmax()
            assert torch.isclose(flat_x[row, j], flat_y[row, j], rtol=2**-8, atol=0)
            assert flat_y[row, j] == flat_x[row, j].to(torch.bfloat16).float()


def test_bf16_scales_round_to_nearest_without_bias():
    # fresh positive fp32 values over 60 decades: the rounding equals torch's fp32 -> bf16 conversion, and the
    # mean relative error of a block scale is ~0 (round to nearest), not ~2^-9 (rounding up would inflate)
    torch.manual_seed(0)
    x = torch.rand(200_000) * 10.0 ** torch.randint(-30, 30, (200_000,)).float()
    r = quant.bf16_round(x)
    assert torch.equal(r, x.to(torch.bfloat16).float())
    rel = (r.double() - x.double()) / x.double()
    assert float(rel.abs().max()) <= 2**-8
    assert abs(float(rel.mean())) < 2e-5  # unbiased; rounding up would give ~2e-3


def test_odd_rows_do_not_share_bytes():
    # two rows of odd length: changing row 1 must not alter row 0's decoded values
    x = torch.randn(2, 65)
    p1, s1 = quant.quantize_blockwise(x)
    x2 = x.clone()
    x2[1] = torch.randn(65)
    p2, s2 = quant.quantize_blockwise(x2)
    assert torch.equal(p1[0], p2[0])
    torch.testing.assert_close(quant.dequantize_blockwise(p1, s1, 65)[0], quant.dequantize_blockwise(p2, s2, 65)[0])


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (3, 4, 11))
    packed = quant.pack_nibbles(codes)
    assert packed.shape == (3, 4, 6) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_nibbles(packed, 11), codes)
    # even element goes to the low nibble
    assert quant.pack_nibbles(torch.tensor([1, 2]))[0].item() == 1 | (2 << 4)


def test_zero_block_decodes_to_zero():
    x = torch.zeros(3, 130)
    x[1, 70] = 5.0
    y = quant.dequantize_blockwise(*quant.quantize_blockwise(x), 130)
    assert torch.equal(y, x)


def test_diagreal_keeps_diagonal_exact():
    a = torch.randn(3, 100, 100)
    a = a @ a.mT + torch.diag_embed(torch.rand(3, 100) * 1e3)  # big diagonal must not swamp scales
    q = quant.quantize_diagreal(a)
    b = quant.dequantize_diagreal(q)
    assert torch.equal(b.diagonal(dim1=-2, dim2=-1), a.diagonal(dim1=-2, dim2=-1))
    off = a - torch.diag_embed(a.diagonal(dim1=-2, dim2=-1))
    # the large diagonal did not enter the block scales: the off-diagonal decodes as if alone
    torch.testing.assert_close(b - torch.diag_embed(b.diagonal(dim1=-2, dim2=-1)), quant.roundtrip_blockwise(off))
    assert (b - a).norm() / off.norm() < 0.15  # 4-bit Linear-2 on Gaussian entries: ~10%


def test_lower_upper_separate_scales():
    n = 150
    g = torch.Generator().manual_seed(3)
    lower = torch.tril(torch.randn(n, n, generator=g), -1)
    upper = torch.triu(torch.randn(n, n, generator=g), 1) * 1e-4  # error state is tiny vs the factor
    q = quant.quantize_lower_upper(lower, upper)
    assert q["codes"].shape == (n, (n + 1) // 2)
    assert q["scales"].shape == (n, 3) and q["diag_block_upper_scale"].shape == (n,)
    lo, up = quant.dequantize_lower_upper(q, n)
    assert torch.equal(lo, torch.tril(lo, -1)) and torch.equal(up, torch.triu(up, 1))
    assert q["scales"].dtype == torch.uint8 and q["scale_exp"].shape == ()  # one byte per block, one exponent
    # each triangle is as accurate as if it had been quantized alone (10^-4 is 13 octaves down: inside the grid)
    for x, y in ((lower, lo), (upper, up)):
        alone = quant.roundtrip_log_blockwise(x)
        torch.testing.assert_close(y, alone, rtol=1e-6, atol=1e-12)
        assert (x - y).norm() / x.norm() < 0.15


def test_rank1_second_moment():
    g = torch.Generator().manual_seed(4)
    v = torch.rand(37, 129, generator=g) ** 4 * torch.logspace(-6, 0, 129)
    q = quant.quantize_rank1(v)
    assert q["codes"].dtype == torch.uint8 and q["max0"].shape == (37,) and q["max1"].shape == (129,)
    w = quant.dequantize_rank1(q, v.shape)
    scale = torch.minimum(q["max0"][:, None], q["max1"][None, :])
    # zero-free linear code, gap 1/16: error <= scale/32 above the smallest code, <= scale/16 below
    # it (values under scale/16 round up to it), and a positive value never rounds to 0
    bound = torch.where(v >= scale / 16, scale / 32, scale / 16) * (1 + 1e-6)
    assert torch.all((v - w).abs() <= bound)
    assert torch.all(w > 0)
    with pytest.raises(ValueError, match="at least 2 dims"):
        quant.quantize_rank1(torch.rand(10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = torch.randn(5, 77, 300)
    p_cpu, s_cpu = quant.quantize_blockwise(x)
    p_gpu, s_gpu = quant.quantize_blockwise(x.cuda())
    assert torch.equal(p_cpu, p_gpu.cpu())
    torch.testing.assert_close(s_cpu, s_gpu.cpu())
