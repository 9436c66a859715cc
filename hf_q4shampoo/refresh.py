"""The refresh stages of Q4Shampoo's step (:class:`RefreshMixin`): statistics updates and inverse-root refreshes
of the factor buckets, in place and batched per stack of one order (the first step's warm-ups of these stages
are in ``warmup.py``).

Where CUDA graphs are enabled (``cuda_graph``, ``graphed_update.py``), a step's statistics updates run as one
replayed graph per refresh slot (:meth:`RefreshMixin._run_statistics`).

A mixin of :class:`~hf_q4shampoo.optimizer.Q4Shampoo`: it reads ``config`` and calls ``_form``, ``_index``,
``_stage``, ``_gram_tf32``, ``_apply_dtype`` and ``_graphs_enabled`` of the optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from . import linalg
from .blocking import extract_blocks
from .graphed_update import flag_finite, gather_with_amax, graphable_grads
from .layout import FactorBucket, Layout, StepBatch, as_slice, stacked_fp32
from .step_graph import KeyedGraphs

__all__ = ["RefreshMixin", "StatisticsSource"]

#: ``batch -> (fp32 gradients of batch.stats_due, stacked; their finite flags)``
StatisticsSource = Callable[[StepBatch], tuple[torch.Tensor, torch.Tensor]]

#: factor entries per batched statistics update: bounds its transients (about six fp32 copies of these, 64 MiB each)
#: while merging a step's due factors of one order into one call on models like GPT-2 (10.6M entries per step at
#: the time-to-target model's 8/80)
_STATS_CALL_ENTRIES = 1 << 24


class RefreshMixin:
    """Statistics updates and root refreshes of :class:`~hf_q4shampoo.optimizer.Q4Shampoo` (module docstring)."""

    def _bucket_update(
        self,
        parts: list[tuple[FactorBucket, list[int]]],
        update: Callable[[dict], None],
        keep: torch.Tensor | None = None,
    ) -> None:
        """Run ``update`` on the stored state of some rows and write the result back in place.

        ``parts``: ``(bucket, rows)`` pairs with the same number of rows, whose keys together make the factors'
        state (a statistics update reads and writes the statistics bucket; a root refresh reads it and writes
        the roots bucket). ``keep`` (one flag per row, on the device) selects the rows that take the new
        values; the others keep their stored ones exactly. This relies on the forms' contract of replacing
        state entries with new tensors, never writing into them (``preconditioners.py``), so ``old`` below is
        still intact.
        """
        sub: dict[str, torch.Tensor] = {}
        places = []  # (bucket, key, window or index)
        for bucket, rows in parts:
            where: slice | torch.Tensor | None = as_slice(rows)
            if where is not None:
                sub.update({k: v[where] for k, v in bucket.storage.items()})
            else:
                where = self._index(rows, bucket.device)
                sub.update({k: v.index_select(0, where) for k, v in bucket.storage.items()})
            places.extend((bucket, k, where) for k in bucket.storage)
        old = dict(sub)
        update(sub)
        for bucket, k, where in places:
            new = sub[k]
            if new is old[k]:
                continue  # untouched: a window is already in place, a copy needs no write
            if keep is not None:
                new = torch.where(keep.reshape(-1, *([1] * (new.dim() - 1))), new, old[k])
            if isinstance(where, slice):
                bucket.storage[k][where].copy_(new)
            else:
                bucket.storage[k].index_copy_(0, where, new)

    def _update_statistics(self, batches: list[StepBatch], gradients: StatisticsSource | None = None) -> None:
        """``L <- beta L + (1 - beta) G G^T`` (and R) for the factors of every batch's due members: the Gram
        matrices per side slot, then one batched update per statistics bucket (all due factors of one order,
        whatever their shape group) of at most :data:`_STATS_CALL_ENTRIES` factor entries, so a step pays one
        factorization call per order rather than one per group and side (host launches, docs/perf_notes.md v18).

        ``gradients(batch)``: the due members' gradients stacked in fp32 and their finite flags (the graphed form,
        :meth:`_run_statistics`, gathers them by address); by default the gradients are stacked here and the flags
        are ``batch.finite``, indexed by member position."""
        pending: dict[int, tuple[FactorBucket, list]] = {}  # id(statistics bucket) -> (it, [(rows, gram, keep)])
        for batch in batches:
            if not batch.stats_due:
                continue
            group, positions = batch.group, batch.stats_due
            if gradients is None:
                g2, finite, flag_of = stacked_fp32([batch.grads[i] for i in positions]), batch.finite, None
            else:
                (g2, finite), flag_of = gradients(batch), {i: j for j, i in enumerate(positions)}
            g2 = g2.reshape(len(positions), *group.plan.matrix_shape)
            tf32 = self._gram_tf32(g2.device)
            # every block of a member with a NaN/inf gradient keeps its statistics (not only the blocks whose own
            # gram is non-finite, which the forms' blend already keeps)
            for slot in group.slots:
                region = group.plan.regions[slot.region_index]
                per = max(1, _STATS_CALL_ENTRIES // max(1, slot.blocks * slot.stats_bucket.order**2))
                for a in range(0, len(positions), per):  # members in pieces: bounded Gram transients
                    chunk = positions[a : a + per]
                    sub = g2 if len(chunk) == g2.shape[0] else g2[a : a + len(chunk)]
                    blocks = extract_blocks(sub, region)
                    with linalg.tf32_matmul(tf32):
                        gram = blocks @ blocks.mT if slot.side == "L" else blocks.mT @ blocks
                    rows = [r for i in chunk for r in slot.member_stats_rows(batch.members[i])]
                    flags = [i if flag_of is None else flag_of[i] for i in chunk for _ in range(slot.blocks)]
                    keep = finite.index_select(0, self._index(flags, finite.device))
                    bucket, parts = pending.setdefault(id(slot.stats_bucket), (slot.stats_bucket, []))
                    parts.append((rows, gram, keep))
                    self._flush_statistics(bucket, parts, full=False)
        for bucket, parts in pending.values():
            self._flush_statistics(bucket, parts, full=True)

    def _flush_statistics(self, bucket: FactorBucket, parts: list, full: bool) -> None:
        """Update the statistics of the factors gathered in ``parts`` (emptied) in one call, once they hold
        :data:`_STATS_CALL_ENTRIES` factor entries or when ``full``."""
        if not parts or (not full and sum(g.numel() for _, g, _ in parts) < _STATS_CALL_ENTRIES):
            return
        rows = [r for part_rows, _, _ in parts for r in part_rows]
        gram = parts[0][1] if len(parts) == 1 else torch.cat([g for _, g, _ in parts])
        keep = parts[0][2] if len(parts) == 1 else torch.cat([k for _, _, k in parts])
        parts.clear()
        form = self._form(bucket.device)
        self._bucket_update([(bucket, rows)], lambda st: form.update_statistics(st, gram), keep)

    def _refresh_roots(self, batches: list[StepBatch]) -> None:
        """Recompute the stored inverse roots of every due factor, one batched call per factor order.

        Factors of a member whose gradient is not finite this step keep their root (the whole update of
        that parameter is skipped)."""
        # statistics bucket -> (its row, the roots bucket's row, index into the flags) of every due factor
        rows: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        pairs: dict[int, tuple[FactorBucket, FactorBucket]] = {}
        flags: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        offsets: dict[torch.device, int] = defaultdict(int)
        for b in batches:
            if not b.roots_due:
                continue
            device = b.finite.device
            base = offsets[device]
            flags[device].append(b.finite)
            offsets[device] += len(b.members)
            for slot in b.group.slots:
                stats = slot.stats_bucket
                pairs.setdefault(id(stats), (stats, slot.bucket))
                if pairs[id(stats)][1] is not slot.bucket:  # pragma: no cover - both are keyed by order and keys
                    raise RuntimeError("Q4Shampoo: the factors of one statistics bucket have roots in two buckets")
                for i in b.roots_due:
                    member = b.members[i]
                    found = zip(slot.member_stats_rows(member), slot.member_rows(member))
                    rows[id(stats)].extend((s, r, base + i) for s, r in found)
        finite = {device: torch.cat(parts) for device, parts in flags.items()}
        for sid, (stats, roots) in pairs.items():
            form = self._form(stats.device)
            due = sorted(rows[sid])
            per = max(1, (1 << 26) // stats.order**2)
            for i in range(0, len(due), per):
                part = due[i : i + per]
                keep = finite[stats.device].index_select(0, self._index([f for _, _, f in part], stats.device))
                parts = [(stats, [s for s, _, _ in part]), (roots, [r for _, r, _ in part])]
                self._bucket_update(parts, form.refresh_root, keep)

    def _run_statistics(self, layout: Layout, batches: list[StepBatch]) -> None:
        """The statistics updates due this step: one replayed CUDA graph per refresh slot where the graphs are
        enabled (:class:`~hf_q4shampoo.step_graph.KeyedGraphs`; the due gradients are gathered by address and
        flagged inside it), else eagerly. Both forms take the same batched calls, so they are bitwise equal."""
        due = [b for b in batches if b.stats_due]
        if not self._graphs_enabled(batches) or not all(map(graphable_grads, due)):
            flag_finite([b for b in due if b.finite is None])
            self._update_statistics(batches)
            return
        graphs = self.__dict__.get("_refresh_graphs")
        if graphs is None:
            graphs = self._refresh_graphs = KeyedGraphs(self.GRAPH_OWNER)
        table = self._address_table(layout, due[0].grads[0].device, "_stats_addresses", graphs)
        starts, offset = {}, 0
        for b in due:
            starts[id(b)], offset = offset, offset + len(b.stats_due)
        key = (
            layout.key,
            id(table),
            tuple((id(b.group), tuple(b.members), tuple(b.stats_due), b.grads[0].dtype) for b in due),
        )
        addresses = [b.grads[i].data_ptr() for b in due for i in b.stats_due]

        def gathered(b: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
            g, amax = gather_with_amax(table.device_table[starts[id(b)] : starts[id(b)] + len(b.stats_due)], b)
            return g, torch.isfinite(amax)

        # a step whose statistics were not replayed (a slot's first sighting or its capture) is not a steady one:
        # the trial (graphed_update.py) does not take it as a sample of the graphed pace
        self._refresh_settled = graphs.run(
            key, lambda: self._update_statistics(due, gathered), lambda: table.fill(addresses)
        )
