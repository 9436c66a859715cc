"""Parameter -> 2-D matrix -> blocks, grouped in regions of equal block shape.

Rules (paper 2's ``BlockPartitioner`` and reshaping, papers.md §1.2, plus two memory rules of ours):

1. Size-1 dimensions are dropped and the tensor is viewed as ``(shape[0], prod(shape[1:]))``
   (a conv weight ``(O, I, kh, kw)`` becomes ``O x (I kh kw)``). Tensors whose view has rank <= 1
   or fewer than ``min_precond_numel`` entries bypass Shampoo (first-order step only).
2. A dimension is **preconditioned** unless it is more than ``max_aspect_ratio`` times longer than
   the other one (embedding vocabularies, LoRA adapters' model side, classifier heads); then only
   the short side gets a factor. Its factor would cost (long/short) times the block's own size in
   memory while carrying little curvature information per entry. Set ``max_aspect_ratio=0`` to
   always precondition both sides.
3. A preconditioned dimension longer than ``max_precond_dim`` is cut into chunks: with
   ``split="fixed"`` (the default, Distributed Shampoo's) into chunks of exactly that size and one
   remainder (2304 -> 2 x 1024 + 256); with ``split="even"`` into the fewest chunks of at most that size,
   as equal as they can be (sizes differ by at most one: 2304 -> 3 x 768). Even chunks cost less memory
   (a factor's size grows with the square of its order: 3 x 768^2 is 82% of 2 x 1024^2 + 256^2) and give
   fewer distinct orders to batch, but trained GPT-2 worse (docs/results.md §4.5). An unpreconditioned
   dimension is never cut.

The blocks of a matrix therefore form at most four *regions* (full x full, full x rest,
rest x full, rest x rest); within a region all blocks have one shape and are extracted with a
single reshape/permute, so the optimizer handles them as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SPLITS",
    "Region",
    "BlockPlan",
    "local_tensor",
    "matrix_view_shape",
    "plan_blocks",
    "extract_blocks",
    "insert_blocks",
]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself: what a rank stores and preconditions."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@dataclass(frozen=True)
class Region:
    """A grid of equally shaped blocks inside the 2-D view of a parameter."""

    row_start: int
    col_start: int
    block_rows: int
    block_cols: int
    n_row_blocks: int
    n_col_blocks: int
    precond_rows: bool  # has a left factor (order block_rows)
    precond_cols: bool  # has a right factor (order block_cols)

    @property
    def num_blocks(self) -> int:
        return self.n_row_blocks * self.n_col_blocks

    @property
    def row_stop(self) -> int:
        return self.row_start + self.block_rows * self.n_row_blocks

    @property
    def col_stop(self) -> int:
        return self.col_start + self.block_cols * self.n_col_blocks


@dataclass(frozen=True)
class BlockPlan:
    matrix_shape: tuple[int, int]
    regions: tuple[Region, ...]

    @property
    def one_sided(self) -> bool:
        """Whether only one side has factors (rule 2: the other is more than ``max_aspect_ratio`` times longer)."""
        first = self.regions[0]
        return first.precond_rows != first.precond_cols


def matrix_view_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int] | None:
    """The 2-D shape a parameter is preconditioned as, or None if it has rank <= 1 after squeezing."""
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return None
    return dims[0], math.prod(dims[1:])


SPLITS = ("even", "fixed")


def _segments(length: int, precond: bool, max_dim: int, split: str = "fixed") -> list[tuple[int, int, int]]:
    """(start, chunk size, number of chunks) runs covering ``length`` (rule 3 of the module docstring)."""
    if not precond or length <= max_dim:
        return [(0, length, 1)]
    if split == "even":
        chunks = -(-length // max_dim)
        size, larger = divmod(length, chunks)  # ``larger`` chunks of size + 1 first, then the others
        segs = [(0, size + 1, larger)] if larger else []
        return segs + [(larger * (size + 1), size, chunks - larger)]
    if split != "fixed":
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    full, rest = divmod(length, max_dim)
    segs = [(0, max_dim, full)]
    if rest:
        segs.append((full * max_dim, rest, 1))
    return segs


def plan_blocks(
    shape: torch.Size | tuple[int, ...],
    max_precond_dim: int = 1024,
    max_aspect_ratio: float = 16.0,
    min_precond_numel: int = 64,
    split: str = "fixed",
) -> BlockPlan | None:
    """Block plan for a parameter of ``shape``, or None if it bypasses Shampoo (see module doc)."""
    view = matrix_view_shape(shape)
    if view is None or view[0] * view[1] < min_precond_numel:
        return None
    rows, cols = view
    precond_rows = precond_cols = True
    if max_aspect_ratio and max_aspect_ratio > 0:
        if rows > max_aspect_ratio * cols:
            precond_rows = False
        elif cols > max_aspect_ratio * rows:
            precond_cols = False
    regions = []
    for r0, a, nr in _segments(rows, precond_rows, max_precond_dim, split):
        for c0, b, nc in _segments(cols, precond_cols, max_precond_dim, split):
            regions.append(Region(r0, c0, a, b, nr, nc, precond_rows, precond_cols))
    return BlockPlan((rows, cols), tuple(regions))


def extract_blocks(matrix: torch.Tensor, region: Region) -> torch.Tensor:
    """The region's blocks as a ``(num_blocks, block_rows, block_cols)`` tensor (row-major order).

    ``matrix`` may carry leading batch dimensions ``(K, rows, cols)``: the result is then
    ``(K * num_blocks, block_rows, block_cols)``, member-major (the blocks of member 0 first).
    """
    lead = matrix.shape[:-2]
    sub = matrix[..., region.row_start : region.row_stop, region.col_start : region.col_stop]
    a, b = region.block_rows, region.block_cols
    blocks = sub.reshape(*lead, region.n_row_blocks, a, region.n_col_blocks, b).transpose(-3, -2)
    return blocks.reshape(-1, a, b)


def insert_blocks(matrix: torch.Tensor, region: Region, blocks: torch.Tensor) -> None:
    """Write ``blocks`` (as returned by :func:`extract_blocks`) back into ``matrix`` in place."""
    lead = matrix.shape[:-2]
    a, b = region.block_rows, region.block_cols
    grid = blocks.reshape(*lead, region.n_row_blocks, region.n_col_blocks, a, b).transpose(-3, -2)
    matrix[..., region.row_start : region.row_stop, region.col_start : region.col_stop] = grid.reshape(
        *lead, region.n_row_blocks * a, region.n_col_blocks * b
    )
