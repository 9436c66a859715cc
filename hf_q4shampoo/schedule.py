"""When each factor is refreshed: the statistics / root schedule of ``Q4Shampoo``.

``update_freq`` / ``root_freq`` (``Q4ShampooConfig.schedule``) say how often; per-parameter offsets spread the
refreshes over consecutive steps (``refresh_spread``) so that no single step pays for every Cholesky and root.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from .blocking import BlockPlan

__all__ = ["is_due", "first_due", "root_due", "first_root", "refresh_cost", "refresh_offsets"]


def is_due(step: int, freq: int, start: int, offset: int) -> bool:
    """Refresh on steps t >= start where t - offset is a positive multiple of ``freq``."""
    return step >= start and step > offset and (step - offset) % freq == 0


def first_due(freq: int, start: int, offset: int) -> int:
    return offset + freq * max(1, math.ceil((start - offset) / freq))


def _early_root(root_freq: int, start: int, offset: int, first_root_step: int) -> int | None:
    """The step of an extra first root (``first_root_step``), or None when it would not come before the regular one."""
    if first_root_step <= 0:
        return None
    early = max(first_root_step, start) + offset
    return early if early < first_due(root_freq, start, offset) else None


def root_due(step: int, root_freq: int, start: int, offset: int, first_root_step: int = 0) -> bool:
    """Whether a factor's inverse root is recomputed at ``step``: on the ``root_freq`` grid (:func:`is_due`), and
    once at ``first_root_step + offset`` when that comes before the grid's first root."""
    return is_due(step, root_freq, start, offset) or step == _early_root(root_freq, start, offset, first_root_step)


def first_root(root_freq: int, start: int, offset: int, first_root_step: int = 0) -> int:
    """The step of a factor's first inverse root (:func:`root_due`); before it the factor's direction is the
    first-order one."""
    early = _early_root(root_freq, start, offset, first_root_step)
    return first_due(root_freq, start, offset) if early is None else early


def refresh_cost(plan: BlockPlan) -> int:
    """Work of one refresh of a parameter's factors, ~ sum of K n^3 (Cholesky / roots are cubic)."""
    cost = 0
    for r in plan.regions:
        cost += r.num_blocks * ((r.block_rows**3 if r.precond_rows else 0) + (r.block_cols**3 if r.precond_cols else 0))
    return cost


def refresh_offsets(
    params: Sequence[tuple[int, tuple[int, ...], int]],
    block_plan: Callable[[tuple[int, ...]], BlockPlan | None],
    spreads: tuple[int, int],
) -> dict[int, tuple[int, int]]:
    """``(statistics offset, root offset)`` of every matrix parameter, by id.

    ``params``: ``(parameter group index, local shape, id)`` in the optimizer's order; ``spreads``:
    ``(min(refresh_spread, update_freq), min(refresh_spread, root_freq))``.

    Statistics spread over ``min(refresh_spread, update_freq)`` steps and roots over
    ``min(refresh_spread, root_freq)``, each balanced on its own. The units placed are runs of
    consecutive parameters of one shape group, as large as a step's share of the work allows, so a
    step refreshes whole stacks of factors (one batched call each: a few factors per call wasted most
    of the GPU, docs/perf_notes.md v7). Greedy, largest first; depends only on the parameter list, and
    a resumed run reads the saved offsets.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    costs: dict[tuple, int] = {}
    for gi, shape, pid in params:
        shape = tuple(shape)
        plan = block_plan(shape)
        if plan is not None:
            groups[(gi, shape)].append(pid)
            costs[(gi, shape)] = refresh_cost(plan)
    total = sum(costs[k] * len(v) for k, v in groups.items())
    per_side = []
    for spread in spreads:
        units = []  # (cost, order, ids)
        for k, ids in groups.items():
            size = max(1, min(len(ids), round(total / spread / max(1, costs[k]))))
            for start in range(0, len(ids), size):
                units.append((costs[k] * len(ids[start : start + size]), len(units), ids[start : start + size]))
        load = [0] * spread
        offsets = {}
        for cost, _, ids in sorted(units, key=lambda u: (-u[0], u[1])):
            slot = min(range(spread), key=lambda s: (load[s], s))
            load[slot] += cost
            offsets.update(dict.fromkeys(ids, slot))
        per_side.append(offsets)
    return {pid: (per_side[0][pid], per_side[1][pid]) for pid in per_side[0]}


def root_shift(update_freq: int, root_freq: int, spreads: tuple[int, int]) -> int:
    """How far to move every root offset so that no step carries both statistics and roots, or 0.

    Statistics fall on steps whose residue modulo ``update_freq`` is below the statistics spread; when
    ``update_freq`` divides ``root_freq`` and both spreads fit in one ``update_freq`` period, roots placed right
    after the statistics' slots never share a step with them (e.g. 100 / 100 with spread 25: statistics on
    residues 0-24, roots on 25-49), which halves the worst step's refresh work.
    """
    stats_spread, root_spread = spreads
    # a spread of 1 is paper 2's schedule exactly (statistics, then roots, on the same step): left alone
    if stats_spread > 1 and root_freq % update_freq == 0 and stats_spread + root_spread <= update_freq:
        return stats_spread
    return 0
