"""Issue 16's other design, for measurement only: owners step whole parameters, updated parameters go to all ranks.

torch's ``ZeroRedundancyOptimizer`` over Q4Shampoo: each rank runs every stage of the step (statistics, roots,
``L^ G R^``, grafting, first-order moments) for the parameters it owns and broadcasts them afterwards, as ZeRO-1
and Distributed Shampoo do. Two things of ZeRO's own measured badly for Q4Shampoo on two H200s
(docs/perf_notes.md v19): it balances parameter counts, while a Shampoo step's cost is dominated by the cubic
refresh of a few factors, and it broadcasts each parameter on its own. :func:`make_zero` can replace the first
with a partition by modelled cost and the second with ZeRO's bucketed parameters (one broadcast per rank).

The cost model is the package's: ``owner_balance.step_share_cost`` (every stage's modelled per-step cost, from GPT-2
small's stage means on one H200), the same one ``shard_parameters`` balances its owners by.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.owner_balance import assign_owners, step_share_cost
from hf_q4shampoo.schedule import refresh_cost


def modelled_costs(params: Sequence[torch.Tensor], options: dict[str, Any]) -> dict[int, float]:
    """Modelled milliseconds per step of each parameter's share of the step, by ``id``: the package's own model
    (``owner_balance.step_share_cost``, which ``shard_parameters`` balances its owners by) on Q4Shampoo's block
    plans."""
    planner = Q4Shampoo([torch.nn.Parameter(torch.zeros(1))], **options)  # block plans only: no state is built
    update_freq, root_freq = planner.config.schedule()
    costs = {}
    for p in params:
        plan = planner.block_plan(p.shape) if p.ndim >= 2 else None
        refresh = refresh_cost(plan) if plan is not None else 0
        costs[id(p)] = step_share_cost(refresh, p.numel(), update_freq, root_freq)
    return costs


class _CostBalancedZero(ZeroRedundancyOptimizer):
    """ZeRO with its parameter partition replaced by ``shard_parameters``' (``owner_balance.assign_owners`` by cost).

    Overrides a private method of torch's ZeRO (``_partition_parameters``; it calls ``_partition_param_group``
    as torch's own does): this is a benchmark's probe of the design, not a supported integration.
    """

    def __init__(self, params: Any, costs: dict[int, float], **kwargs: Any) -> None:
        self._modelled_costs = costs
        super().__init__(params, **kwargs)

    def _partition_parameters(self, params_per_rank: list[list[torch.Tensor]] | None = None) -> list[list[dict]]:
        if params_per_rank is not None or len(self._partition_parameters_cache) != 0:
            return super()._partition_parameters(params_per_rank)
        self._partition_parameters_cache = [[] for _ in range(self.world_size)]
        params = [p for group in self.param_groups for p in group["params"]]
        # the package's own balance (shard_parameters'), over all groups at once
        owners = assign_owners([(self._modelled_costs.get(id(p), 0.0), 0, 0) for p in params], self.world_size)
        owner_of = {id(p): o for p, o in zip(params, owners)}
        for group in self.param_groups:
            per_rank: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
            for p in group["params"]:
                per_rank[owner_of[id(p)]].append(p)
            self._partition_param_group(group, per_rank)
        return self._partition_parameters_cache


def make_zero(
    groups: list[dict[str, Any]], lr: float, options: dict[str, Any], balanced: bool, bucket_view: bool
) -> ZeroRedundancyOptimizer:
    """Q4Shampoo under ZeRO: ``balanced`` partitions by modelled cost; ``bucket_view``: one broadcast per rank."""
    options = {**options, "shard_preconditioners": False}
    # whole-optimizer options go to the constructor: ZeRO copies its defaults into every group it hands on
    local = functools.partial(Q4Shampoo, **options)
    kwargs: dict[str, Any] = {"optimizer_class": local, "lr": lr, "parameters_as_bucket_view": bucket_view}
    if not balanced:
        return ZeroRedundancyOptimizer(groups, **kwargs)
    params = [p for g in groups for p in g["params"]]
    return _CostBalancedZero(groups, costs=modelled_costs(params, options), **kwargs)
