"""The first step's warm-ups: everything that compiles or loads at a kernel's first use, done once per process
when the optimizer's layout is built, so that none of it stalls training later.

* the root decoder of each factor order (compiled when preconditioning starts: a 1.5 s stall mid-run, v7);
* one statistics update and one root refresh of a copy of one factor per order (cuSOLVER's Cholesky and the
  root iteration's products load at their first launch: ~150-200 ms at the first refresh, v9);
* one first-order step of a copy of one member per shape group that takes the Triton 4-bit AdamW kernels;
* with ``cuda_graph=True``, the gradient gather of the graphed update per shape group (it only reads).

All of them work on copies, so the first pass is a dry run (``triton_precompile``): the Triton kernels they
would compile are recorded, skipped, and compiled in parallel; cuSOLVER and cuBLAS load as they run. Where that
is not available (CPU, no Triton) the warm-ups run for real and compile one by one, as before.

The functions take the :class:`~hf_q4shampoo.optimizer.Q4Shampoo` (``opt``: its config, forms and first-order
step). A warm-up is a ``(key, run)`` pair; keys name what it prepares (device, order or shape, and the configuration,
whose fields pick the kernels' compile-time constants), and a key done once in the process is not done again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .first_order import adamw_kernel
from .layout import FactorBucket, Layout, ShapeGroup, StepBatch
from .triton_gather import SOURCE_DTYPES, stack_by_address
from .triton_precompile import compile_in_parallel

__all__ = ["run_first_step_warm_ups", "first_step_warm_ups"]

WarmUp = tuple[tuple, Callable[[], None]]

#: keys of the warm-ups already done in this process
_DONE: set[tuple] = set()


def _decoder(opt: Any, bucket: FactorBucket) -> WarmUp | None:
    """Decode a copy of a stack of one and of two roots (the compiled torch decoder specialises a stack of one)."""
    if not opt.config.use_compile or bucket.device.type in ("cpu", "meta") or bucket.kind != "roots":
        return None
    roots = dict(bucket.storage)
    form, dtype = opt._form(bucket.device), opt._apply_dtype(bucket.device)

    def run() -> None:
        for size in (1, 2):
            form.root({k: v[:1].expand(size, *v.shape[1:]).contiguous() for k, v in roots.items()}, dtype)

    return ("decoder", bucket.device, bucket.order, dtype, repr(opt.config)), run


def _refresh(opt: Any, stats: FactorBucket, roots: FactorBucket) -> WarmUp | None:
    """One statistics update and one root refresh of a copy of the first factor of a statistics bucket (with the
    matching roots bucket's first root)."""
    if stats.device.type != "cuda":
        return None
    form = opt._form(stats.device)

    def run() -> None:
        sample = {k: v[:1].clone() for k, v in {**stats.storage, **roots.storage}.items()}
        form.update_statistics(sample, torch.eye(stats.order, device=stats.device).unsqueeze(0))
        form.refresh_root(sample)

    return ("refresh", stats.device, stats.order, repr(opt.config)), run


def _first_order(opt: Any, group: ShapeGroup) -> WarmUp | None:
    """One first-order step of a copy of the group's first member, where it takes the Triton 4-bit AdamW
    kernels (they take shapes as arguments, so the batch size does not matter). Other paths are left alone:
    torch.compile specialises to the batch size, so a copy of one member would compile a graph the step
    never uses."""
    cfg = opt.config
    p = group.params[0]
    if cfg.first_order != "adamw" or cfg.grafting != "norm":
        return None
    if p.device.type != "cuda" or adamw_kernel(group.params[:1], group.moments, cfg.use_compile) != "triton":
        return None

    def run() -> None:
        copy = ShapeGroup(
            group.group_index,
            group.shape,
            [p.detach().clone()],
            [{}],
            group.plan,
            moments={k: v[:1].clone() for k, v in group.moments.items()},
        )
        direction = p.detach().float().unsqueeze(0)  # any finite values: only the kernels' compilation matters
        opt._first_order_step(StepBatch(copy, [0], 1, []), direction)

    return ("first_order", p.device, tuple(p.shape), p.dtype, repr(cfg)), run


def _gather(opt: Any, group: ShapeGroup) -> WarmUp | None:
    """The graphed update's gradient gather (``cuda_graph=True``) for this group's shape and dtype."""
    p = group.params[0]
    if p.device.type != "cuda" or not opt.config.cuda_graph or p.dtype not in SOURCE_DTYPES:
        return None

    def run() -> None:
        stack_by_address(torch.tensor([p.data_ptr()], dtype=torch.int64, device=p.device), tuple(p.shape), p.dtype)

    return ("gather", p.device, tuple(p.shape), p.dtype), run


def first_step_warm_ups(opt: Any, layout: Layout) -> list[WarmUp]:
    """The warm-ups ``layout`` needs that this process has not done yet (one per key)."""
    pairs = {id(s.stats_bucket): (s.stats_bucket, s.bucket) for g in layout.groups for s in g.slots if s.stats_bucket}
    found = [_decoder(opt, b) for b in layout.buckets] + [_refresh(opt, *pair) for pair in pairs.values()]
    found += [_first_order(opt, g) for g in layout.groups] + [_gather(opt, g) for g in layout.groups]
    todo: dict[tuple, Callable[[], None]] = {}
    for item in found:
        if item is not None and item[0] not in _DONE:
            todo.setdefault(*item)
    return list(todo.items())


def run_first_step_warm_ups(opt: Any, layout: Layout) -> int:
    """Run the warm-ups ``layout`` needs (module docstring); returns how many ran."""
    todo = first_step_warm_ups(opt, layout)
    if not todo:
        return 0

    def run_all() -> None:
        for _, run in todo:
            run()

    if not compile_in_parallel(run_all):  # no dry run possible, or it failed: warm up for real
        run_all()
    _DONE.update(key for key, _ in todo)
    return len(todo)
