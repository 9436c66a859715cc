"""Q4Shampoo under DDP: the ranks share the preconditioner work and memory, and exchange 4-bit roots.

Under plain DDP every rank sees the same all-reduced gradient, so without this module every rank would keep
every statistic and compute every root: more GPUs would add no optimizer throughput and save no optimizer
memory. Here each matrix parameter gets one *owner* rank (``owner_balance.assign_owners``, balanced by refresh cost and
the same on every rank). Only the owner keeps the parameter's statistics and error feedback, updates them and
computes its inverse roots; when roots are refreshed, the owners all-gather the new 4-bit root codes, block
scales and 2-byte diagonals (:meth:`DdpSplit.exchange_roots`), and every rank applies every root itself.

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

``shard_parameters`` (opt-in) splits the whole step instead: an owner (balanced by ``owner_balance.step_share_cost``)
updates its parameters completely and holds all their state, and :meth:`DdpSplit.share_parameters` all-gathers the
updated parameters after every step (ZeRO-1's and Distributed Shampoo's way: 4 bytes per fp32 parameter per step
instead of the roots' ~0.5 byte per factor entry per refresh, in exchange for splitting the apply, grafting and
first-order work that the root design replicates).

Collectives: one ``all_gather`` of a uint8 buffer on steps where some root is refreshed (never on other
steps), or under ``shard_parameters`` one of the updated parameters every step; object gathers when a checkpoint is
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
    "split_for",
    "is_root_key",
    "strip_statistics",
    "ExchangeCounters",
    "keep_owned_work",
    "is_dtensor",
]

#: Alignment of each piece of a root payload, so that every piece can be viewed as its own dtype in place.
_ALIGN = 8


def strip_statistics(state: dict[str, Any]) -> None:
    """Drop the statistics and error feedback of a parameter's side states, keeping its roots (in place)."""
    for sides in state.get("regions", []):
        for name, side in list(sides.items()):
            sides[name] = {k: v for k, v in side.items() if is_root_key(k)}


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
    #: ``shard_parameters``: exchanges of the updated parameters (one all-gather per step) and the bytes each rank
    #: received
    parameter_exchanges: int = 0
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
        as raw bytes (4-bit codes, one-byte scales and their exponents, fp16 diagonals and their scales), so
        receivers hold exactly the owner's values.
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
        from step to step). At the first call the parameters move into one flat buffer per rank
        (:class:`SharedParameters`: each owner's parameters side by side in its slice, every replica with the
        same layout), so every later exchange is one in-place ``all_gather_into_tensor`` of that buffer: no
        packing, no copies, and every replica holds exactly the owner's bytes. Packing into rounds instead cost
        two to three times the all-gather itself on two H200s (docs/perf_notes.md v20).
        """
        shared = self.__dict__.get("_shared")
        if shared is None or not shared.still_holds(by_owner):
            shared = self._shared = SharedParameters(by_owner, self.world_size)
        dist.all_gather_into_tensor(shared.flat, shared.slice(self.rank), group=self.group)
        self.counters.parameter_bytes_received += shared.slice_bytes * (self.world_size - 1)
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


class SharedParameters:
    """The parameters of ``shard_parameters`` rehoused in one flat byte buffer, laid out for an in-place
    all-gather: rank ``r``'s slice holds the parameters ``r`` owns, each at an 8-byte aligned offset, and every
    rank's slice is as long as the longest (the padding is what an all-gather of unequal shares costs).

    Each parameter's ``.data`` becomes a view of its place in the buffer, with its own shape and strides, after
    its values are copied there: the Parameter objects (what DDP, the model and this optimizer hold) stay the
    same. The buffer replaces the parameters' own storage, so memory grows only by the padding. Parameters that
    share storage with another (views of one tensor), lie on different devices, or are not dense in memory
    cannot move and are refused with a message.
    """

    def __init__(self, by_owner: Sequence[Sequence[torch.Tensor]], world_size: int) -> None:
        params = [p for owned in by_owner for p in owned]
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                "Q4Shampoo shard_parameters: this rank's parameters lie on several devices "
                f"({sorted(map(str, devices))}); the parameter exchange needs them on one. Set shard_parameters=false."
            )
        storages: dict[int, torch.Tensor] = {}
        for p in params:
            key = p.untyped_storage().data_ptr()
            if key in storages and storages[key] is not p:
                raise ValueError(
                    "Q4Shampoo shard_parameters: two parameters share one storage (views of one tensor), so they "
                    "cannot move into the exchange buffer apart. Set shard_parameters=false."
                )
            storages[key] = p
            _check_dense(p)
        streams = []
        for owned in by_owner:
            at, laid = 0, []
            for p in owned:
                laid.append((p, at))
                at += _aligned(p.nbytes)
            streams.append((laid, at))
        self.by_owner = by_owner
        self.slice_bytes = max((length for _, length in streams), default=0)
        device = next(iter(devices)) if devices else torch.device("cpu")
        self.flat = torch.empty(self.slice_bytes * world_size, dtype=torch.uint8, device=device)
        self._pointers = []
        for owner, (laid, _) in enumerate(streams):
            base = owner * self.slice_bytes
            for p, at in laid:
                place = self.flat[base + at : base + at + p.nbytes].view(p.dtype)
                place = place.as_strided(p.shape, p.stride(), place.storage_offset())
                place.copy_(p.detach())
                p.data = place
                self._pointers.append(p.data_ptr())

    def slice(self, rank: int) -> torch.Tensor:
        return self.flat[rank * self.slice_bytes : (rank + 1) * self.slice_bytes]

    def still_holds(self, by_owner: Sequence[Sequence[torch.Tensor]]) -> bool:
        """Whether the same parameters still live in this buffer (not if a parameter's ``.data`` was replaced
        since, e.g. by ``model.to(...)``: then the buffer is laid out again)."""
        if by_owner is not self.by_owner:
            return False
        return [p.data_ptr() for owned in by_owner for p in owned] == self._pointers


def _check_dense(p: torch.Tensor) -> None:
    """Refuse a parameter whose elements do not fill one run of memory (overlapping or gapped strides): its
    bytes could not be one piece of the exchange buffer. Dense layouts other than contiguous (channels_last)
    are fine: the buffer keeps each parameter's strides."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(p.stride(), p.shape) if sz > 1):
        if stride != expected:
            raise ValueError(
                f"Q4Shampoo shard_parameters: a parameter of shape {tuple(p.shape)} and strides {p.stride()} is "
                "not dense in memory, so it cannot move into the exchange buffer; make it contiguous "
                "(param.data = param.data.contiguous()) or set shard_parameters=false"
            )
        expected *= size


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
