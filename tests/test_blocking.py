import pytest
import torch

from hf_q4shampoo.blocking import extract_blocks, insert_blocks, matrix_view_shape, plan_blocks


def test_matrix_view_shape():
    assert matrix_view_shape((64, 3, 7, 7)) == (64, 147)  # conv: O x (I kh kw)
    assert matrix_view_shape((1, 768, 1)) is None  # squeezes to 1-D
    assert matrix_view_shape((5, 1, 3)) == (5, 3)
    assert matrix_view_shape((10,)) is None


def test_plan_regions_cover_matrix_once():
    plan = plan_blocks((2500, 2304), max_precond_dim=1024, max_aspect_ratio=16)
    covered = torch.zeros(2500, 2304, dtype=torch.int32)
    for r in plan.regions:
        covered[r.row_start : r.row_stop, r.col_start : r.col_stop] += 1
        assert r.block_rows <= 1024 and r.block_cols <= 1024
        assert r.precond_rows and r.precond_cols
    assert torch.all(covered == 1)
    shapes = sorted((r.block_rows, r.block_cols, r.num_blocks) for r in plan.regions)
    assert shapes == [(452, 256, 1), (452, 1024, 2), (1024, 256, 2), (1024, 1024, 4)]


def test_aspect_rule_and_bypass():
    emb = plan_blocks((50257, 768), 1024, 16)  # vocabulary side not preconditioned, not cut
    assert len(emb.regions) == 1
    r = emb.regions[0]
    assert (r.block_rows, r.block_cols, r.precond_rows, r.precond_cols) == (50257, 768, False, True)
    lora_a = plan_blocks((8, 4096), 1024, 16)  # LoRA A: only the r x r side
    assert all(not r.precond_cols and r.precond_rows and r.block_cols == 4096 for r in lora_a.regions)
    both = plan_blocks((50257, 768), 1024, 0)  # rule disabled: cut into 1024-row blocks
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
