"""Which rank owns which parameter under DDP: :func:`assign_owners` and its cost model.

Each owned parameter is a *unit* with a modelled cost in milliseconds: under the preconditioner split its
statistics and roots (amortised over ``update_freq`` / ``root_freq``), under ``shard_parameters`` also its
every-step update (:func:`step_share_cost`), and on the steps where its statistics or roots are refreshed, one
round of each (:func:`refresh_round_ms`). Owners balance the ranks' totals (memory, mean time) and, because the
ranks meet in a collective at every step, the work of each step. The same units give the same owners on every
rank: nothing here depends on the rank or on a device.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = [
    "assign_owners",
    "busiest_rank_mean",
    "refine_owners",
    "refresh_round_ms",
    "step_profiles",
    "step_share_cost",
]

#: Longest schedule period :func:`step_profiles` models (update and root frequencies whose lcm is longer are
#: modelled over its first steps).
_MAX_PERIOD = 10_000

#: modelled milliseconds of one step's work, from GPT-2 small's stage means on one H200 at update_freq=10,
#: root_freq=100 (docs/perf_notes.md v19): apply + grafting + first-order 6.3 ms for 124.4M parameters, a statistics
#: round 55 ms and a root round 530 ms for a total ``refresh_cost`` of 1.65e11. Only the ratios matter: they
#: balance whole-parameter shares (``shard_parameters``), whose every-step work the refresh cost alone ignores.
_MS_PER_ELEMENT = 5.06e-8
_MS_PER_STATISTICS_UNIT = 3.33e-10
_MS_PER_ROOT_UNIT = 3.21e-9


def refresh_round_ms(refresh: int) -> tuple[float, float]:
    """Modelled milliseconds of one statistics update and of one root computation of a parameter (``refresh``,
    ``schedule.refresh_cost``): the work its refresh steps carry (``shard_parameters``' per-step balance)."""
    return refresh * _MS_PER_STATISTICS_UNIT, refresh * _MS_PER_ROOT_UNIT


def step_share_cost(refresh: int, numel: int, update_freq: int, root_freq: int) -> float:
    """Modelled milliseconds per step that owning a whole parameter costs (``shard_parameters``): its every-step
    update (``numel``) plus its statistics and roots (``refresh``, ``schedule.refresh_cost``) amortised."""
    return (
        numel * _MS_PER_ELEMENT
        + refresh * _MS_PER_STATISTICS_UNIT / update_freq
        + refresh * _MS_PER_ROOT_UNIT / root_freq
    )


def assign_owners(units: Sequence[tuple], world_size: int, freqs: tuple[int, int] | None = None) -> list[int]:
    """The owner rank of each unit (a parameter).

    ``units``: ``(cost, statistics offset, root offset)`` per parameter, in the optimizer's order
    (``schedule.refresh_cost`` and ``schedule.refresh_offsets``), or ``(cost, statistics offset, root offset,
    statistics cost, root cost)`` where the work due at the refresh steps differs from the cost that makes up a
    rank's total (``shard_parameters``: the total is the whole per-step share, ``step_share_cost``; the steps
    carry one statistics or root round of the parameter, ``refresh_round_ms``). Greedy, most expensive first: a
    unit goes to the rank with the least work in total plus at the steps where it is refreshed (its statistics
    and root offsets), then the least in total, then the lowest rank. Ranks wait for each other at every DDP
    step, so the work of each step is balanced too, not only the total (memory, mean time). Depends only on
    ``units``: every rank computes the same owners.

    ``freqs``: ``(update_freq, root_freq)`` of 5-tuple units. Given, the greedy owners are then improved by
    :func:`refine_owners`, which moves units between ranks while the modelled mean over a schedule period of
    each step's busiest rank falls (what a DDP step waits for): the greedy's per-step terms outweigh its totals,
    and on GPT-2 small at two ranks it left the totals 9.04 / 8.05 ms apart (measured 10.1 / 8.7 ms of work).
    """
    total = [0.0] * world_size
    at_step: dict[tuple[int, str, int], float] = defaultdict(float)
    owners = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-units[i][0], i)):
        cost, stats_offset, root_offset = units[i][:3]
        stats_cost, root_cost = units[i][3:5] if len(units[i]) == 5 else (cost, cost)
        rank = min(
            range(world_size),
            key=lambda r: (total[r] + at_step[r, "s", stats_offset] + at_step[r, "r", root_offset], total[r], r),
        )
        owners[i] = rank
        total[rank] += cost
        at_step[rank, "s", stats_offset] += stats_cost
        at_step[rank, "r", root_offset] += root_cost
    if freqs is not None and units and all(len(u) == 5 for u in units):
        owners = refine_owners(units, owners, world_size, freqs)
    return owners


def step_profiles(units: Sequence[tuple], freqs: tuple[int, int]) -> np.ndarray:
    """Modelled milliseconds of each 5-tuple unit at every step of one schedule period (``units x period``,
    float64): its every-step work (the total less its amortised refreshes) plus one statistics round on the
    steps ``t = statistics offset (mod update_freq)`` and one root round on ``t = root offset (mod root_freq)``."""
    update_freq, root_freq = freqs
    period = min(math.lcm(update_freq, root_freq), _MAX_PERIOD)
    t = np.arange(period)
    rows = []
    for cost, stats_offset, root_offset, stats_ms, root_ms in units:
        every_step = max(0.0, cost - stats_ms / update_freq - root_ms / root_freq)
        stats_due = t % update_freq == stats_offset % update_freq
        root_due = t % root_freq == root_offset % root_freq
        rows.append(every_step + stats_ms * stats_due + root_ms * root_due)
    return np.stack(rows) if rows else np.zeros((0, period))


def _rank_work(profiles: np.ndarray, owners: Sequence[int], world_size: int) -> np.ndarray:
    work = np.zeros((world_size, profiles.shape[1]))
    np.add.at(work, np.asarray(owners, dtype=np.int64), profiles)
    return work


def busiest_rank_mean(profiles: np.ndarray, owners: Sequence[int], world_size: int) -> float:
    """Mean over the period of the busiest rank's modelled milliseconds per step (what DDP's steps wait for)."""
    return float(_rank_work(profiles, owners, world_size).max(0).mean())


def refine_owners(
    units: Sequence[tuple], owners: Sequence[int], world_size: int, freqs: tuple[int, int], passes: int = 20
) -> list[int]:
    """Local search on ``owners``: move one unit at a time (most expensive first) to the rank that lowers
    :func:`busiest_rank_mean` most, until a pass moves nothing (at most ``passes``). NumPy float64 in a fixed
    order (no threads, unlike small torch CPU ops, which slow down 100x beside a busy core): every rank computes
    the same owners."""
    profiles = step_profiles(units, freqs)
    owners = list(owners)
    work = _rank_work(profiles, owners, world_size)
    best = float(work.max(0).mean())
    order = sorted(range(len(owners)), key=lambda i: (-float(units[i][0]), i))
    for _ in range(passes):
        moved = False
        for i in order:
            here = owners[i]
            work[here] -= profiles[i]
            choice, choice_mean = here, best
            for rank in range(world_size):
                if rank == here:
                    continue
                work[rank] += profiles[i]
                mean = float(work.max(0).mean())
                work[rank] -= profiles[i]
                if mean < choice_mean - 1e-9:
                    choice, choice_mean = rank, mean
            work[choice] += profiles[i]
            if choice != here:
                owners[i], best, moved = choice, choice_mean, True
        if not moved:
            break
    return owners
