"""Q4Shampoo under DDP: the ranks share the preconditioner work and memory, and exchange 4-bit roots.

Under plain DDP every rank sees the same all-reduced gradient, so without this module every rank would keep
every statistic and compute every root: more GPUs would add no optimizer throughput and save no optimizer
memory. Here each matrix parameter gets one *owner* rank (:func:`assign_owners`, balanced by refresh cost and
the same on every rank). Only the owner keeps the parameter's statistics and error feedback, updates them and
computes its inverse roots; when roots are refreshed, the owners all-gather the new 4-bit root codes, block
scales and fp32 diagonals (:meth:`DdpSplit.exchange_roots`), and every rank applies every root itself.

Why roots and not directions (Distributed Shampoo all-gathers the preconditioned directions every step): a
stored root is ~0.5 byte per factor entry and changes every ``root_freq`` steps, while a direction is 2-4 bytes
per parameter every step. The price is that every rank still applies every root (``L^ G R^``) and runs the
first-order step; those stay replicated, as do the first-order moments (the step needs them for every
parameter, and splitting them would mean all-gathering the updated parameters every step, as ZeRO-1 does).

What stays exact: the owner runs the single-process code on the same gradient, the roots travel bit for bit,
and every rank forms the same shape groups as one process (not split by owner: the update takes the same
batched calls; ``layout.py``), so replicas stay bitwise equal. Against
one process the statistics are bitwise equal; a root computed in another batch of factors than one process would
use can differ in its last bits (seen on CPU, in a few roots; tests/test_distributed.py compares with a tolerance
far below what a wrong or missing root changes).
The refresh schedule and its offsets are the single-process ones, so a state saved from any world size is
the single-process state (:meth:`DdpSplit.gather_states` assembles it for a checkpoint) and loads on any
world size.

``shard_parameters`` (opt-in) splits the whole step instead: an owner (balanced by :func:`step_share_cost`)
updates its matrices completely and holds all their state, and :meth:`DdpSplit.share_parameters` all-gathers the
updated matrices after every step (ZeRO-1's and Distributed Shampoo's way: 4 bytes per fp32 parameter per step
instead of the roots' ~0.5 byte per factor entry per refresh, in exchange for splitting the apply, grafting and
first-order work that the root design replicates).

Collectives: one ``all_gather`` of a uint8 buffer on steps where some root is refreshed (never on other
steps), or under ``shard_parameters`` one of the updated matrices every step; object gathers when a checkpoint is
consolidated. Nothing here reads a device value on the host:
every size is known from shapes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .layout import FactorBucket, IndexCache, ShapeGroup, StepBatch, is_root_key

__all__ = [
    "DdpSplit",
    "assign_owners",
    "balance_by_cost",
    "split_for",
    "is_root_key",
    "strip_statistics",
    "ExchangeCounters",
    "keep_owned_work",
    "is_dtensor",
    "step_share_cost",
]

#: Alignment of each piece of a root payload, so that every piece can be viewed as its own dtype in place.
_ALIGN = 8


def strip_statistics(state: dict[str, Any]) -> None:
    """Drop the statistics and error feedback of a parameter's side states, keeping its roots (in place)."""
    for sides in state.get("regions", []):
        for name, side in list(sides.items()):
            sides[name] = {k: v for k, v in side.items() if is_root_key(k)}


def assign_owners(units: Sequence[tuple[int, int, int]], world_size: int) -> list[int]:
    """The owner rank of each matrix parameter.

    ``units``: ``(refresh cost, statistics offset, root offset)`` per matrix parameter, in the optimizer's
    order (``schedule.refresh_cost`` and ``schedule.refresh_offsets``). Greedy, most expensive first: a
    parameter goes to the rank with the least work in total plus at the steps where it is refreshed (its
    statistics and root offsets), then the least in total, then the lowest rank. Ranks wait for each other
    at every DDP step, so the work of each step is balanced too, not only the total (memory, mean time).
    Depends only on ``units``: every rank computes the same owners.
    """
    total = [0] * world_size
    at_step: dict[tuple[int, str, int], int] = defaultdict(int)
    owners = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: (-units[i][0], i)):
        cost, stats_offset, root_offset = units[i]
        rank = min(
            range(world_size),
            key=lambda r: (total[r] + at_step[r, "s", stats_offset] + at_step[r, "r", root_offset], total[r], r),
        )
        owners[i] = rank
        total[rank] += cost
        at_step[rank, "s", stats_offset] += cost
        at_step[rank, "r", root_offset] += cost
    return owners


def balance_by_cost(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of each parameter under ``shard_parameters``: greedy, most expensive first, to the rank
    with the least modelled cost so far (then the lowest rank). ``costs``: ``step_share_cost`` per parameter.
    Unlike :func:`assign_owners` it ignores refresh steps: an owner's every-step update (``L^ G R^``, grafting,
    first-order moments) dominates its mean, and on two H200s this plain balance left the ranks' stage sums
    within 6% of each other (docs/perf_notes.md v20). Depends only on ``costs``: every rank computes the same."""
    load = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


@dataclass
class ExchangeCounters:
    """What the root exchanges moved so far (host numbers, known from shapes: no device sync)."""

    #: all-gathers run (one per step on which some root was refreshed)
    exchanges: int = 0
    #: root bytes the owners contributed, summed over ranks (what a perfectly packed exchange would move)
    payload_bytes: int = 0
    #: bytes each rank received from the others (the padded all-gather: (world size - 1) x the largest share)
    received_bytes: int = 0
    #: consolidations of a checkpoint (``consolidate_state_dict``) and the bytes they gathered
    consolidations: int = 0
    #: ``shard_parameters``: exchanges of the updated parameters (one per step), their all-gather rounds (bounded
    #: in size) and the bytes each rank received
    parameter_exchanges: int = 0
    parameter_rounds: int = 0
    parameter_bytes_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Section:
    """The rows of one factor order that one owner sends in one exchange, and where they live on this rank."""

    bucket: FactorBucket
    rows: list[int] = field(default_factory=list)


class DdpSplit:
    """The ranks of a DDP process group sharing Q4Shampoo's preconditioner work (see the module docstring)."""

    def __init__(self, group: Any = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.counters = ExchangeCounters()
        # row indices on the device, made once per pattern (a list copied to an accelerator makes the host wait)
        self._index = IndexCache()

    # ---- roots ---------------------------------------------------------------------------------
    def exchange_roots(self, due: Sequence[tuple[ShapeGroup, list[int]]]) -> None:
        """All-gather the roots refreshed this step, from their owners into every rank's buckets.

        ``due``: ``(shape group, members)`` whose roots were due this step, for every owner, in the layout's
        order (the same list on every rank). The owners have already refreshed their rows; each piece travels
        as raw bytes (4-bit codes, fp32 scales and diagonals), so receivers hold exactly the owner's values.
        """
        sections = self._sections(due)
        sizes = [self._payload_bytes(sections.get(r, {})) for r in range(self.world_size)]
        largest = max(sizes)
        if largest == 0:
            return
        mine = sections.get(self.rank, {})
        device = next(iter(mine.values())).bucket.device if mine else self._device(sections)
        send = self._pack(mine, largest, device)
        received = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        dist.all_gather(received, send, group=self.group)
        for owner, buffer in enumerate(received):
            if owner != self.rank:
                self._unpack(sections.get(owner, {}), buffer)
        self.counters.exchanges += 1
        self.counters.payload_bytes += sum(sizes)
        self.counters.received_bytes += largest * (self.world_size - 1)

    def _sections(self, due: Sequence[tuple[ShapeGroup, list[int]]]) -> dict[int, dict[int, _Section]]:
        """owner -> factor order -> the rows (in this rank's bucket of that order) sent in this exchange."""
        out: dict[int, dict[int, _Section]] = defaultdict(dict)
        for group, members in due:
            for slot in group.slots:
                for m in members:
                    section = out[group.owners[m]].setdefault(slot.bucket.order, _Section(slot.bucket))
                    if section.bucket is not slot.bucket:  # pragma: no cover - buckets are keyed by order and keys
                        raise RuntimeError("Q4Shampoo: one owner's roots of one order lie in two buckets")
                    section.rows.extend(slot.member_rows(m))
        return {owner: dict(sorted(by_order.items())) for owner, by_order in out.items()}

    @staticmethod
    def _pieces(section: _Section) -> list[tuple[str, int]]:
        """``(root key, bytes)`` of a section, in the order they travel (every rank computes the same)."""
        storage = section.bucket.storage
        out = []
        for key in sorted(k for k in storage if is_root_key(k)):
            row = storage[key][0]
            out.append((key, _aligned(len(section.rows) * row.nbytes)))
        return out

    def _payload_bytes(self, sections: dict[int, _Section]) -> int:
        return sum(nbytes for section in sections.values() for _, nbytes in self._pieces(section))

    def _device(self, sections: dict[int, dict[int, _Section]]) -> torch.device:
        for by_order in sections.values():
            for section in by_order.values():
                return section.bucket.device
        raise AssertionError("no section")  # pragma: no cover

    def _pack(self, sections: dict[int, _Section], size: int, device: torch.device) -> torch.Tensor:
        parts = []
        for section in sections.values():
            index = self._index(section.rows, device)
            for key, nbytes in self._pieces(section):
                raw = section.bucket.storage[key].index_select(0, index).reshape(-1).view(torch.uint8)
                parts.append(raw)
                if nbytes > raw.numel():
                    parts.append(torch.zeros(nbytes - raw.numel(), dtype=torch.uint8, device=device))
        used = sum(p.numel() for p in parts)
        if size > used:
            parts.append(torch.zeros(size - used, dtype=torch.uint8, device=device))
        return torch.cat(parts) if parts else torch.zeros(size, dtype=torch.uint8, device=device)

    def _unpack(self, sections: dict[int, _Section], buffer: torch.Tensor) -> None:
        offset = 0
        for section in sections.values():
            storage = section.bucket.storage
            index = self._index(section.rows, buffer.device)
            for key, nbytes in self._pieces(section):
                target = storage[key]
                count = len(section.rows) * target[0].nbytes
                values = buffer[offset : offset + count].view(target.dtype)
                target.index_copy_(0, index, values.reshape(len(section.rows), *target.shape[1:]))
                offset += nbytes

    # ---- parameters (shard_parameters) ----------------------------------------------------------
    def share_parameters(self, by_owner: Sequence[Sequence[torch.Tensor]]) -> None:
        """All-gather the parameters their owners have just updated, into every rank's parameters (in place).

        ``by_owner[r]``: the parameters rank ``r`` owns, in the same order on every rank (the same list object
        from step to step: its round plan, which depends on shapes only, is made once). Each owner's parameters
        travel as one stream of their raw bytes (each 8-byte aligned), so every replica holds exactly the owner's
        values; round ``i`` carries bytes ``[i c, (i + 1) c)`` of every owner's stream (``c`` =
        ``_SHARE_ROUND_BYTES`` / world size), one ``all_gather_into_tensor`` each, the owner packing straight into
        its slice of the output. A parameter larger than a round is cut across rounds, so no round pads a small
        share up to a large parameter; packing and unpacking are one multi-tensor copy per round, of 8-byte words
        where the offsets allow (byte-wise copies took 3.1 ms of a 4.5 ms exchange on GPT-2 small, perf_notes v20).
        """
        plan = self.__dict__.get("_share_plan")
        if plan is None or plan[0] is not by_owner:
            plan = self._share_plan = (by_owner, _share_rounds(by_owner, self.world_size))
        for size, placed in plan[1]:
            device = next(p.device for pieces in placed for p, _, _, _ in pieces)
            output = torch.empty(size * self.world_size, dtype=torch.uint8, device=device)
            mine = placed[self.rank]
            if mine:  # padding bytes are left as they are: nobody reads them
                base = self.rank * size
                torch._foreach_copy_(*_word_views([(output, base + at, p, start, n) for p, start, n, at in mine]))
            dist.all_gather_into_tensor(output, output[self.rank * size : (self.rank + 1) * size], group=self.group)
            theirs = [
                (p, start, n, owner * size + at)
                for owner, pieces in enumerate(placed)
                if owner != self.rank
                for p, start, n, at in pieces
            ]
            if theirs:
                received, parameters = _word_views([(output, at, p, start, n) for p, start, n, at in theirs])
                torch._foreach_copy_(parameters, received)
            self.counters.parameter_bytes_received += size * (self.world_size - 1)
            self.counters.parameter_rounds += 1
        self.counters.parameter_exchanges += 1

    # ---- checkpoints ---------------------------------------------------------------------------
    def gather_states(self, owned: dict[int, Any], to: int | None) -> list[dict[int, Any]] | None:
        """Every rank's ``owned`` states (CPU tensors; keyed by parameter position), on rank ``to`` (None: on
        every rank). A collective: every rank of the group must call it."""
        self.counters.consolidations += 1
        if to is None:
            out: list[Any] = [None] * self.world_size
            dist.all_gather_object(out, owned, group=self.group)
            return out
        out = [None] * self.world_size if self.rank == to else None
        dist.gather_object(owned, out, dst=dist.get_global_rank(self.group, to) if self.group else to, group=self.group)
        return out


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


#: the most bytes one round of ``DdpSplit.share_parameters`` gathers (all ranks together): its transient buffer
_SHARE_ROUND_BYTES = 256 * 2**20


def _memory_bytes(p: torch.Tensor) -> torch.Tensor:
    """``p``'s elements as raw bytes in memory order (a view: writing it writes ``p``). Every rank's replica has
    the same strides, so memory order is a common order; a dense parameter in another layout (channels_last)
    is read as it lies. Overlapping or gapped parameters cannot be, and are refused."""
    t = p.detach()
    if not t.is_contiguous():
        strides = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
        expected = 1
        for st, sz in strides:
            if st != expected:
                raise ValueError(
                    f"Q4Shampoo shard_parameters: a parameter of shape {tuple(t.shape)} and strides {t.stride()} "
                    "is not dense in memory, so its bytes cannot travel as one run; make it contiguous "
                    "(param.data = param.data.contiguous()) or set shard_parameters=false"
                )
            expected *= sz
        t = t.as_strided((t.numel(),), (1,))
    return t.reshape(-1).view(torch.uint8)


def _word_views(
    pieces: Sequence[tuple[torch.Tensor, int, torch.Tensor, int, int]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For pieces ``(buffer, offset in it, parameter, first byte in it, bytes)``: the buffer's and the parameter's
    bytes as two lists of views, each pair of the widest integer type (8, 4, 2 or 1 bytes) that both start
    addresses and the length allow. The same bytes either way; a copy of 8-byte words moves them ~8x faster than
    one of bytes, whose element count bounds the copy kernel."""
    buffers, params = [], []
    for buffer, at, p, start, n in pieces:
        raw = _memory_bytes(p)[start : start + n]
        ours = buffer[at : at + n]
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            size = dtype.itemsize
            if n % size == 0 and raw.data_ptr() % size == 0 and ours.data_ptr() % size == 0:
                break
        buffers.append(ours.view(dtype))
        params.append(raw.view(dtype))
    return buffers, params


def _share_rounds(
    by_owner: Sequence[Sequence[torch.Tensor]], world_size: int
) -> list[tuple[int, list[list[tuple[torch.Tensor, int, int, int]]]]]:
    """The rounds of :meth:`DdpSplit.share_parameters`: per round, the bytes of each rank's slice and, per owner,
    its pieces ``(parameter, first byte in it, bytes, offset in the slice)``. From shapes only: the same on every
    rank. Each owner's stream lays its parameters at 8-byte aligned offsets; a round takes the next ``c`` bytes of
    every stream, cutting a parameter where the round ends."""
    per_round = max(_SHARE_ROUND_BYTES // world_size // _ALIGN * _ALIGN, _ALIGN)
    streams = []
    for params in by_owner:
        at, laid = 0, []
        for p in params:
            laid.append((p, at))
            at += _aligned(p.nbytes)
        streams.append((laid, at))
    longest = max((length for _, length in streams), default=0)
    rounds = []
    for begin in range(0, longest, per_round):
        end = begin + per_round
        placed = []
        for laid, _ in streams:
            pieces = []
            for p, at in laid:
                lo, hi = max(at, begin), min(at + p.nbytes, end)
                if lo < hi:
                    pieces.append((p, lo - at, hi - lo, lo - begin))
            placed.append(pieces)
        size = max((pieces[-1][3] + pieces[-1][2] for pieces in placed if pieces), default=0)
        rounds.append((_aligned(size), placed))
    return rounds


#: modelled milliseconds of one step's work, from GPT-2 small's stage means on one H200 at update_freq=10,
#: root_freq=100 (docs/perf_notes.md v19): apply + grafting + first-order 6.3 ms for 124.4M parameters, a statistics
#: round 55 ms and a root round 530 ms for a total ``refresh_cost`` of 1.65e11. Only the ratios matter: they
#: balance whole-parameter shares (``shard_parameters``), whose every-step work the refresh cost alone ignores.
_MS_PER_ELEMENT = 5.06e-8
_MS_PER_STATISTICS_UNIT = 3.33e-10
_MS_PER_ROOT_UNIT = 3.21e-9


def step_share_cost(refresh: int, numel: int, update_freq: int, root_freq: int) -> float:
    """Modelled milliseconds per step that owning a whole parameter costs (``shard_parameters``): its every-step
    update (``numel``) plus its statistics and roots (``refresh``, ``schedule.refresh_cost``) amortised."""
    return (
        numel * _MS_PER_ELEMENT
        + refresh * _MS_PER_STATISTICS_UNIT / update_freq
        + refresh * _MS_PER_ROOT_UNIT / root_freq
    )


def split_for(enabled: bool, params: Sequence[torch.Tensor]) -> DdpSplit | None:
    """The split of the default process group, if it applies: ``enabled`` (``shard_preconditioners``),
    ``torch.distributed`` initialised with more than one rank, and no parameter is a DTensor (FSDP2 shards the
    parameters themselves; each rank then preconditions its own shard)."""
    if not enabled or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    if any(is_dtensor(p) for p in params):
        return None
    return DdpSplit()


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def keep_owned_work(batches: list[StepBatch], rank: int) -> list[tuple[ShapeGroup, list[int]]]:
    """Under DDP with the work split: drop the statistics and root work of matrices owned by other ranks from
    ``batches`` and return every rank's due roots (``(group, members)``, in the layout's order), which the
    owners then all-gather."""
    shared = []
    for b in batches:
        owners = b.group.owners
        if b.group.plan is None or not owners or owners[0] is None:
            continue
        if b.roots_due:
            shared.append((b.group, [b.members[i] for i in b.roots_due]))
        b.stats_due = [i for i in b.stats_due if owners[b.members[i]] == rank]
        b.roots_due = [i for i in b.roots_due if owners[b.members[i]] == rank]
    return shared
