"""The refresh stages of Q4Shampoo's step (:class:`RefreshMixin`): statistics updates and inverse-root refreshes
of the factor buckets, in place and batched per stack of one order, and the first step's warm-ups (the root
decoder's compilation, cuSOLVER's and the products' first launches) so that none of it stalls training later.

A mixin of :class:`~hf_q4shampoo.optimizer.Q4Shampoo`: it reads ``config`` and calls ``_form``, ``_index``,
``_stage``, ``_gram_tf32`` and ``_apply_dtype`` of the optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from . import linalg
from .blocking import extract_blocks
from .distributed import is_root_key
from .layout import FactorBucket, SideSlot, StepBatch, stacked_fp32
from .preconditioners import PreconditionerForm

__all__ = ["RefreshMixin", "warm_refresh"]


class RefreshMixin:
    """Statistics updates and root refreshes of :class:`~hf_q4shampoo.optimizer.Q4Shampoo` (module docstring)."""

    def _precompile(self, form: PreconditionerForm, bucket: FactorBucket) -> None:
        """Decode roots of a new order once now, so its compilation (accelerators only: the Triton decoder,
        once for every order, or the compiled torch decoder, once per order) happens at the first step
        instead of in the middle of training when preconditioning starts (a 1.5 s stall, v7)."""
        if not self.config.use_compile or bucket.device.type in ("cpu", "meta"):
            return
        warmed = self.__dict__.setdefault("_warmed_orders", set())
        key = (bucket.device, bucket.order)
        if key in warmed:
            return
        warmed.add(key)
        roots = {k: v for k, v in bucket.storage.items() if k.startswith("root")}
        # a stack of one and of two roots: dynamo specializes a batch of size 1 separately
        for size in (1, 2):
            form.root(
                {k: v[:1].expand(size, *v.shape[1:]).contiguous() for k, v in roots.items()},
                self._apply_dtype(bucket.device),
            )

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


#: (device, order, form) already warmed in this process
_WARMED: set[tuple] = set()


def warm_refresh(form: PreconditionerForm, bucket: FactorBucket) -> None:
    """Run one statistics update and one root refresh of a copy of one factor, per order, at the first step.

    CUDA loads a library's kernels (cuSOLVER's Cholesky, the fp32 products of the root iteration) at their
    first launch: the first refresh of a run paid ~150-200 ms for it, the worst step of every configuration
    in docs/perf_notes.md v9. The copy is discarded.
    """
    key = (bucket.device, bucket.order, form.name)
    if bucket.device.type != "cuda" or key in _WARMED or all(is_root_key(k) for k in bucket.storage):
        return
    _WARMED.add(key)
    sample = {k: v[:1].clone() for k, v in bucket.storage.items()}
    form.update_statistics(sample, torch.eye(bucket.order, device=bucket.device).unsqueeze(0))
    form.refresh_root(sample)
