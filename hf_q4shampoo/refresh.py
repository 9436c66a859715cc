"""The refresh stages of Q4Shampoo's step (:class:`RefreshMixin`): statistics updates and inverse-root refreshes
of the factor buckets, in place and batched per stack of one order (the first step's warm-ups of these stages
are in ``warmup.py``).

A mixin of :class:`~hf_q4shampoo.optimizer.Q4Shampoo`: it reads ``config`` and calls ``_form``, ``_index``,
``_stage``, ``_gram_tf32`` and ``_apply_dtype`` of the optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from . import linalg
from .blocking import extract_blocks
from .layout import FactorBucket, SideSlot, StepBatch, stacked_fp32

__all__ = ["RefreshMixin"]


class RefreshMixin:
    """Statistics updates and root refreshes of :class:`~hf_q4shampoo.optimizer.Q4Shampoo` (module docstring)."""

    def _bucket_update(
        self, bucket: FactorBucket, rows: list[int], update: Callable[[dict], None], keep: torch.Tensor | None = None
    ) -> None:
        """Run ``update`` on the stored state of some rows of a bucket and write the result back in place.

        ``keep`` (one flag per row, on the device) selects the rows that take the new values; the others
        keep their stored ones exactly. This relies on the forms' contract of replacing state entries with
        new tensors, never writing into them (``preconditioners.py``), so ``old`` below is still intact.
        """
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        if contiguous:
            window = slice(rows[0], rows[0] + len(rows))
            sub = {k: v[window] for k, v in bucket.storage.items()}
        else:
            index = self._index(rows, bucket.device)
            sub = {k: v.index_select(0, index) for k, v in bucket.storage.items()}
        old = dict(sub)
        update(sub)
        for k, v in bucket.storage.items():
            new = sub[k]
            if keep is not None and new is not old[k]:
                new = torch.where(keep.reshape(-1, *([1] * (new.dim() - 1))), new, old[k])
            if contiguous:
                if new is not old[k]:
                    v[window].copy_(new)
            else:
                v.index_copy_(0, index, new)

    def _chunks(self, positions: list[int], slot: SideSlot) -> list[list[int]]:
        """Split member positions so one call handles at most ~2^26 factor entries (bounded transients)."""
        per = max(1, (1 << 26) // max(1, slot.blocks * slot.bucket.order**2))
        return [positions[i : i + per] for i in range(0, len(positions), per)]

    def _update_statistics(self, batch: StepBatch) -> None:
        """``L <- beta L + (1 - beta) G G^T`` (and R) for the factors of the batch's due members."""
        group, positions = batch.group, batch.stats_due
        g2 = stacked_fp32([batch.grads[i] for i in positions]).reshape(len(positions), *group.plan.matrix_shape)
        form = self._form(g2.device)
        tf32 = self._gram_tf32(g2.device)
        for slot in group.slots:
            region = group.plan.regions[slot.region_index]
            for chunk in self._chunks(list(range(len(positions))), slot):
                sub = g2 if len(chunk) == g2.shape[0] else g2[chunk[0] : chunk[-1] + 1]
                blocks = extract_blocks(sub, region)
                with linalg.tf32_matmul(tf32):
                    gram = blocks @ blocks.mT if slot.side == "L" else blocks.mT @ blocks
                rows = [r for i in chunk for r in slot.member_rows(batch.members[positions[i]])]
                # every block of a member with a NaN/inf gradient keeps its statistics (not only the blocks
                # whose own gram is non-finite, which the forms' blend already keeps)
                flags = [positions[i] for i in chunk for _ in range(slot.blocks)]
                keep = batch.finite.index_select(0, self._index(flags, batch.finite.device))
                self._bucket_update(slot.bucket, rows, lambda st, gram=gram: form.update_statistics(st, gram), keep)

    def _refresh_roots(self, batches: list[StepBatch]) -> None:
        """Recompute the stored inverse roots of every due factor, one batched call per factor order.

        Factors of a member whose gradient is not finite this step keep their root (the whole update of
        that parameter is skipped)."""
        rows: dict[int, list[tuple[int, int]]] = defaultdict(list)  # bucket -> (row, index into its flags)
        buckets: dict[int, FactorBucket] = {}
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
                buckets[id(slot.bucket)] = slot.bucket
                rows[id(slot.bucket)].extend((r, base + i) for i in b.roots_due for r in slot.member_rows(b.members[i]))
        finite = {device: torch.cat(parts) for device, parts in flags.items()}
        for bid, bucket in buckets.items():
            form = self._form(bucket.device)
            due = sorted(rows[bid])
            per = max(1, (1 << 26) // bucket.order**2)
            for i in range(0, len(due), per):
                part = due[i : i + per]
                keep = finite[bucket.device].index_select(0, self._index([f for _, f in part], bucket.device))
                self._bucket_update(bucket, [r for r, _ in part], form.refresh_root, keep)
