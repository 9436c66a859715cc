import pytest
import torch

from hf_q4shampoo.blocking import extract_blocks, insert_blocks, matrix_view_shape, plan_blocks


def test_matrix_view_shape():
    assert matrix_view_shape((64, 3, 7, 7)) == (64, 147)  # conv: O x (I kh kw)
    assert matrix_view_shape((1, 768, 1)) is None  # squeezes to 1-D
    assert matrix_view_shape((5, 1, 3)) == (5, 3)
    assert matrix_view_shape((10,)) is None


@pytest.mark.parametrize(
    "split, expected",
    [
        ("fixed", [(452, 256, 1), (452, 1024, 2), (1024, 256, 2), (1024, 1024, 4)]),  # 2500 = 2 x 1024 + 452
        ("even", [(833, 768, 6), (834, 768, 3)]),  # 2500 = 834 + 2 x 833, 2304 = 3 x 768
    ],
)
def test_plan_regions_cover_matrix_once(split, expected):
    plan = plan_blocks((2500, 2304), max_precond_dim=1024, max_aspect_ratio=16, split=split)
    covered = torch.zeros(2500, 2304, dtype=torch.int32)
    for r in plan.regions:
        covered[r.row_start : r.row_stop, r.col_start : r.col_stop] += 1
        assert r.block_rows <= 1024 and r.block_cols <= 1024
        assert r.precond_rows and r.precond_cols
    assert torch.all(covered == 1)
    shapes = sorted((r.block_rows, r.block_cols, r.num_blocks) for r in plan.regions)
    assert shapes == expected


@pytest.mark.parametrize("length", [1025, 2048, 2304, 3000, 3072, 4097, 50257])
def test_even_split_uses_the_fewest_blocks_equal_within_one(length):
    plan = plan_blocks((length, 700), max_precond_dim=1024, max_aspect_ratio=0, split="even")
    sizes = [r.block_rows for r in plan.regions for _ in range(r.n_row_blocks)]
    assert sum(sizes) == length and max(sizes) <= 1024 and max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-length // 1024)
    with pytest.raises(ValueError, match="split='halves'; allowed: even, fixed"):
        plan_blocks((length, 700), 1024, 0, split="halves")


def test_aspect_rule_and_bypass():
    emb = plan_blocks((50257, 768), 1024, 16)  # vocabulary side not preconditioned, not cut
    assert len(emb.regions) == 1
    r = emb.regions[0]
    assert (r.block_rows, r.block_cols, r.precond_rows, r.precond_cols) == (50257, 768, False, True)
    lora_a = plan_blocks((8, 4096), 1024, 16)  # LoRA A: only the r x r side
    assert all(not r.precond_cols and r.precond_rows and r.block_cols == 4096 for r in lora_a.regions)
    both = plan_blocks((50257, 768), 1024, 0)  # rule disabled: cut into 49 blocks of 1024 rows and one of 81
    assert sum(r.num_blocks for r in both.regions) == 50
    assert plan_blocks((768,), 1024) is None
    assert plan_blocks((4, 4), 1024, 16, min_precond_numel=64) is None
    assert plan_blocks((8, 8), 1024, 16, min_precond_numel=64) is not None


@pytest.mark.parametrize("shape", [(37, 53), (2500, 2304), (130, 1000), (64, 3, 3, 3)])
def test_extract_insert_roundtrip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    plan = plan_blocks(shape, max_precond_dim=64, max_aspect_ratio=0)
    m = x.reshape(plan.matrix_shape)
    out = torch.full_like(m, float("nan"))
    for r in plan.regions:
        blocks = extract_blocks(m, r)
        assert blocks.shape == (r.num_blocks, r.block_rows, r.block_cols)
        # block k of the region is rows (k // n_col_blocks), cols (k % n_col_blocks)
        k = r.num_blocks - 1
        i, j = divmod(k, r.n_col_blocks)
        ref = m[
            r.row_start + i * r.block_rows : r.row_start + (i + 1) * r.block_rows,
            r.col_start + j * r.block_cols : r.col_start + (j + 1) * r.block_cols,
        ]
        assert torch.equal(blocks[k], ref)
        insert_blocks(out, r, blocks)
    assert torch.equal(out, m)
