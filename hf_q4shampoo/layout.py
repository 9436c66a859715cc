"""Where Q4Shampoo's state lives: persistent stacked buffers with per-parameter views.

A step works on *shape groups* (parameters of one parameter group with the same local shape, dtype and
device: GPT-2 small has a dozen) and on *factor buckets* (every Kronecker factor of one order on one
device). Each bucket keeps every state tensor of its factors stacked in one buffer (``storage[key]``,
leading dimension = factor rows), and the per-parameter state that ``state_dict`` shows is made of views
into those buffers. So:

* a step reads the roots of a whole shape group as one slice of a bucket and decodes them in one call
  (no per-step concatenation), and extracts, preconditions and re-inserts the blocks of all the group's
  parameters with one batched op per region instead of one per parameter;
* a refresh of some factors gathers their rows, updates them and writes them back in place, so the views
  (and the checkpoint) always hold the current state and no buffer is re-allocated.

Row order inside a bucket: shape group, then region of the block plan, then side (L, R), then member
parameter, then block; so the rows of one (group, region, side) form one contiguous range, member-major.

Each factor's state is in two buckets of its order: its inverse root (``root*`` keys, what every step reads) in a
*roots* bucket and its statistics (and error feedback) in a *statistics* bucket; a root refresh reads the second and
writes the first. Under DDP with the work split among ranks (``distributed.py``), every matrix parameter has an
*owner* rank that alone keeps the statistics: shape groups are *not* split by owner (every rank forms the same
groups and batches as one process, so the update takes the same batched calls and replicas stay bitwise equal);
a group's roots occupy contiguous rows of its roots bucket for every member, and its statistics rows exist only
for the members this rank owns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .blocking import BlockPlan, Region
from .blocking import local_tensor as _local
from .capture_guard import refuse_in_capture

__all__ = [
    "FactorBucket",
    "SideSlot",
    "ShapeGroup",
    "Layout",
    "build_layout",
    "IndexCache",
    "layout_members",
    "step_gradients",
    "StepBatch",
    "step_batches",
    "stacked_fp32",
    "check_dense_real",
    "is_root_key",
    "as_slice",
]

State = dict[str, torch.Tensor]


def is_root_key(key: str) -> bool:
    """Whether a side-state key belongs to the stored inverse root (kept and applied by every rank)."""
    return key.startswith("root")


def as_slice(rows: list[int]) -> slice | None:
    """``rows`` as a slice when they are consecutive and ascending (then a view reads them, and writes go in place,
    instead of a gather and a scatter), else None."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return None


class MemberRows:
    """The rows of some members (positions in a shape group) in the group's stacked buffers: views when the members
    are a run (what a step writes into them lands in place), else copies gathered by an index, which
    :meth:`write_back` scatters again. ``index_of(rows, device)`` makes that index (an optimizer's ``IndexCache``)."""

    def __init__(self, members: list[int], index_of: Callable[[list[int], torch.device], torch.Tensor], device):
        self.span = as_slice(members)
        self.index = None if self.span is not None else index_of(members, device)

    def take(self, stacked: State) -> State:
        if self.span is not None:
            return {k: v[self.span] for k, v in stacked.items()}
        return {k: v.index_select(0, self.index.to(v.device)) for k, v in stacked.items()}

    def write_back(self, stacked: State, rows: State) -> None:
        """Put ``rows`` (from :meth:`take`, updated) back into ``stacked``; nothing to do for views."""
        if self.span is None:
            for k, v in stacked.items():
                v.index_copy_(0, self.index.to(v.device), rows[k])

    def count_skips(self, counts: torch.Tensor, keep: torch.Tensor) -> None:
        """Add the members whose ``keep`` flag is false to their ``skipped_updates`` counters (on the device)."""
        if self.span is not None:
            counts[self.span].add_(~keep)
        else:
            counts.index_add_(0, self.index.to(counts.device), (~keep).to(counts.dtype))


@dataclass(eq=False)
class FactorBucket:
    """Factors of order ``order`` on ``device``: one stacked buffer per state key; ``kind`` says which part of
    their state it holds, ``"roots"`` (the ``root*`` keys) or ``"statistics"`` (the others)."""

    order: int
    device: torch.device
    storage: State = field(default_factory=dict)
    rows: int = 0
    kind: str = "roots"


@dataclass(eq=False)
class SideSlot:
    """The factors of one side (``"L"`` or ``"R"``) of one region for every member of a shape group."""

    region_index: int
    side: str
    bucket: FactorBucket  # the roots bucket: every member's roots
    start: int  # first bucket row of member 0
    blocks: int  # blocks per member in this region (rows per member)
    #: the statistics bucket, its first row, and which members hold statistics there (all of them in one
    #: process; under DDP the ones this rank owns), in member order
    stats_bucket: FactorBucket | None = None
    stats_start: int = 0
    stats_members: dict[int, int] = field(default_factory=dict)  # member -> position among the holders

    def member_rows(self, member: int) -> range:
        """The member's rows in the roots bucket."""
        first = self.start + member * self.blocks
        return range(first, first + self.blocks)

    def member_stats_rows(self, member: int) -> range:
        """The member's rows in the statistics bucket (it must hold statistics on this rank)."""
        first = self.stats_start + self.stats_members[member] * self.blocks
        return range(first, first + self.blocks)


@dataclass(eq=False)
class ShapeGroup:
    """Parameters of one parameter group sharing local shape, dtype and device."""

    group_index: int
    shape: tuple[int, ...]
    params: list[torch.Tensor]  # local tensors (the DTensor shard under FSDP2)
    states: list[dict]
    plan: BlockPlan | None
    slots: list[SideSlot] = field(default_factory=list)
    #: first-order state of the members stacked along dim 0 (``(K, *per-parameter shape)`` per key)
    moments: State = field(default_factory=dict)
    #: the members' ``skipped_updates`` counters stacked, ``(K,)`` (the per-parameter entries are views)
    skipped: torch.Tensor | None = None
    #: per member, the rank that keeps its statistics and computes its roots (None: not split among ranks)
    owners: list[int | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.params)

    def region_slots(self, region_index: int) -> dict[str, SideSlot]:
        return {s.side: s for s in self.slots if s.region_index == region_index}


@dataclass(eq=False)
class Layout:
    groups: list[ShapeGroup]
    buckets: list[FactorBucket]
    key: tuple


def _side_order(region: Region, side: str) -> int:
    return region.block_rows if side == "L" else region.block_cols


def build_layout(
    members: Sequence[tuple[int, torch.Tensor, dict]],
    plan_of,
    moment_keys,
    key: tuple,
    owners: Sequence[int | None] | None = None,
) -> Layout:
    """Group ``(param group index, local param, state)`` triples and move their factor states into buckets.

    ``plan_of(shape)`` gives the block plan, ``moment_keys(state)`` the first-order state keys, which are
    stacked per shape group. ``owners`` (one per member, under DDP with the work split) records each matrix's
    owner rank; a member whose side states hold only roots (owned by another rank) gets no statistics rows.
    The per-parameter side states are replaced by views of the bucket buffers (their values are copied over
    first), so a layout can be rebuilt at any time, e.g. after ``load_state_dict`` or when a parameter gets its
    first gradient late.
    """
    by_key: dict[tuple, ShapeGroup] = {}
    for i, (gi, p, state) in enumerate(members):
        k = (gi, tuple(p.shape), p.dtype, p.device)
        if k not in by_key:
            by_key[k] = ShapeGroup(gi, tuple(p.shape), [], [], plan_of(p.shape) if "regions" in state else None)
        by_key[k].params.append(p)
        by_key[k].states.append(state)
        by_key[k].owners.append(owners[i] if owners is not None and "regions" in state else None)
    groups = list(by_key.values())
    for group in groups:
        for k in moment_keys(group.states[0]):
            group.moments[k] = torch.stack([s[k] for s in group.states])
            for i, s in enumerate(group.states):
                s[k] = group.moments[k][i]
        if all("skipped_updates" in s for s in group.states):
            group.skipped = torch.stack([s["skipped_updates"].reshape(()) for s in group.states])
            for i, s in enumerate(group.states):
                s["skipped_updates"] = group.skipped[i]
    buckets: dict[tuple, FactorBucket] = {}
    pieces: dict[int, list[State]] = {}  # id(bucket) -> side states in row order

    def bucket_for(device: torch.device, order: int, kind: str, keys: tuple[str, ...]) -> FactorBucket:
        return buckets.setdefault((device, order, kind, keys), FactorBucket(order, device, kind=kind))

    for group in groups:
        if group.plan is None:
            continue
        device = group.params[0].device
        for ri, region in enumerate(group.plan.regions):
            for side in ("L", "R"):
                if side not in group.states[0]["regions"][ri]:
                    continue
                order, sides = _side_order(region, side), [s["regions"][ri][side] for s in group.states]
                roots = bucket_for(device, order, "roots", tuple(sorted(k for k in sides[0] if is_root_key(k))))
                slot = SideSlot(ri, side, roots, roots.rows, region.num_blocks)
                roots.rows += region.num_blocks * group.size
                pieces.setdefault(id(roots), []).extend(sides)
                # the statistics of the members that hold them here (another rank's keep only their roots)
                holders = [m for m, st in enumerate(sides) if any(not is_root_key(k) for k in st)]
                if holders:
                    stat_keys = tuple(sorted(k for k in sides[holders[0]] if not is_root_key(k)))
                    stats = bucket_for(device, order, "statistics", stat_keys)
                    slot.stats_bucket, slot.stats_start = stats, stats.rows
                    slot.stats_members = {m: i for i, m in enumerate(holders)}
                    stats.rows += region.num_blocks * len(holders)
                    pieces.setdefault(id(stats), []).extend(sides[m] for m in holders)
                group.slots.append(slot)
    for bucket in buckets.values():
        sides = pieces[id(bucket)]
        keys = [k for k in sides[0] if is_root_key(k) == (bucket.kind == "roots")]
        bucket.storage = {k: torch.cat([s[k] for s in sides]) for k in keys}
        start = 0
        for s in sides:
            n = s[keys[0]].shape[0]
            for k in keys:
                s[k] = bucket.storage[k][start : start + n]
            start += n
    return Layout(groups, list(buckets.values()), key)


class IndexCache:
    """Device index tensors for row lists, made once per distinct list.

    The row patterns of a run repeat (one per refresh offset), so each is copied once, and on CUDA from
    pinned memory without blocking: a copy from pageable memory makes the host wait for the GPU's queue,
    which was 5 waits per refresh step in a run's first refresh round (docs/perf_notes.md v13).
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, rows: Iterable[int], device: torch.device) -> torch.Tensor:
        rows = tuple(rows)
        key = (rows, device)
        index = self._cache.get(key)
        if index is None:
            refuse_in_capture(device, "a new index copied from host memory")  # the pinned buffer is reused later
            host = torch.tensor(rows, dtype=torch.long)
            if device.type == "cuda":  # a pageable copy would make the host wait for the GPU's queue
                host = host.pin_memory()
            index = self._cache[key] = host.to(device, non_blocking=True)
        return index

    def clear(self) -> None:
        self._cache.clear()


def layout_members(param_groups: Sequence[dict], state: dict) -> list[tuple[int, torch.Tensor, dict]]:
    """``(group index, local parameter, state)`` of every parameter that has state, in group order: what
    :func:`build_layout` groups (the layout's key is built from the states' ids)."""
    return [(gi, _local(p), state[p]) for gi, g in enumerate(param_groups) for p in g["params"] if state.get(p)]


def step_gradients(
    param_groups: Sequence[dict], state: dict, init_state, check_param, skip: frozenset[int] = frozenset()
) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
    """The step's bookkeeping shared by the optimizers built on a layout: every parameter with a non-empty
    (local) gradient gets its state (``init_state(p, state)`` the first time, after ``check_param(p)``, which runs
    again only for a sparse or complex gradient) and
    its CPU step counter advanced; parameters whose ``id`` is in ``skip`` are left alone (under
    ``shard_parameters``, those another rank updates). Returns ``{id(state): local gradient}`` and
    ``{id(state): new step}``.

    The counters are CPU tensors advanced in one multi-tensor op and read back in one ``tolist``: no device
    synchronisation.
    """
    grads: dict[int, torch.Tensor] = {}
    counters = []
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None or id(p) in skip:
                continue
            st = state[p]
            # the parameter's checks once, before its state is made; afterwards only a gradient that could fail
            # them is checked again (the full check, for its message): on a model of ~150 tensors the checks of
            # every parameter at every step were estimated at ~0.3-0.5 ms of host time (docs/perf_notes.md v25)
            if not st or g.is_sparse or g.is_complex():
                check_param(p)
            if not st:
                init_state(p, st)
            local_g = _local(g)
            if local_g.numel() == 0:
                continue
            grads[id(st)] = local_g
            counters.append(st["step"])
    if not grads:
        return grads, {}
    torch._foreach_add_(counters, 1.0)
    return grads, {sid: int(v) for sid, v in zip(grads, torch.stack(counters).tolist())}


def check_dense_real(p: torch.Tensor, owner: str) -> None:
    """Refuse a sparse gradient or a complex parameter (``owner`` names the optimizer), as torch's optimizers do."""
    if p.grad.is_sparse:
        raise RuntimeError(
            f"{owner} does not support sparse gradients. Use dense gradients (e.g. "
            "nn.Embedding(sparse=False)) or torch.optim.SparseAdam for sparse embeddings."
        )
    if torch.is_complex(p) or torch.is_complex(p.grad):
        raise RuntimeError(
            f"{owner} does not support complex parameters. Optimise torch.view_as_real(param) "
            "as a real parameter instead."
        )


@dataclass(eq=False)
class StepBatch:
    """Members (positions in ``group``) that have a gradient this step and share one step count."""

    group: ShapeGroup
    members: list[int]
    step: int
    grads: list[torch.Tensor]
    # positions (into ``members``) whose statistics / roots are due this step, and those preconditioned
    stats_due: list[int] = field(default_factory=list)
    roots_due: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    #: per-member max |gradient| and whether it is finite, ``(len(members),)`` on the gradients' device
    amax: torch.Tensor | None = None
    finite: torch.Tensor | None = None


def stacked_fp32(grads: list[torch.Tensor]) -> torch.Tensor:
    """Same-shape gradients as one fp32 ``(K, *shape)`` stack; a single fp32 gradient is returned as a view of
    itself (no copy), so callers must not write into the result.

    Not cached on the batch: the statistics stage and the step each stack and free their own copy, so at most one
    batch's stack is alive at a time (a cached one per batch would keep 4 bytes per parameter alive across both
    stages of a statistics step)."""
    return grads[0].float().unsqueeze(0) if len(grads) == 1 else torch.stack(grads).float()


def step_batches(layout: Layout, grads: dict[int, torch.Tensor], steps: dict[int, int]) -> list[StepBatch]:
    """This step's work, one batch per (shape group, step count); usually one batch per shape group."""
    out = []
    for group in layout.groups:
        by_step: dict[int, list[int]] = {}
        for m, state in enumerate(group.states):
            if id(state) in grads:
                by_step.setdefault(steps[id(state)], []).append(m)
        for step, members in by_step.items():
            out.append(StepBatch(group, members, step, [grads[id(group.states[m])] for m in members]))
    return out
