"""The per-step update of Q4Shampoo (:class:`DirectionMixin`): ``L^ G R^`` from the decoded 4-bit roots, grafting
(to the gradient's or to the Adam step's norm, block by block), and the first-order step, for one batch of
same-shape members at a time; members with a non-finite gradient or direction keep their parameter and moments.

A mixin of :class:`~hf_q4shampoo.optimizer.Q4Shampoo`: it reads ``config`` and ``param_groups`` and calls
``_form``, ``_index``, ``_stage`` and ``_apply_dtype`` of the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .blocking import extract_blocks, insert_blocks
from .first_order import adam_filtered_batch_step, adam_graft_batch_step, adamw_batch_step, sgd_batch_step
from .layout import MemberRows, SideSlot, StepBatch, as_slice, stacked_fp32

__all__ = ["DirectionMixin"]

_GRAFT_EPS = 1e-12


def _frobenius(x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Per-member Frobenius norms of a ``(K, rows, cols)`` stack, without overflow.

    Squaring in fp32 overflows once entries pass ~1e19 (a 96 x 80 gradient of 1e18 has norm 8.8e19, but its
    squares sum to inf), so each member is divided by its largest magnitude first and the norm scaled back.
    ``amax`` (the per-member max |x|) may be given when already known. Members with a NaN/inf entry get a
    non-finite norm, which the caller treats as a skipped update.
    """
    if amax is None:
        amax = torch.linalg.vector_norm(x, ord=math.inf, dim=(-2, -1))
    # an all-zero member: norm 0 whatever the divisor; one launch where ``where(amax > 0, amax, 1)`` took two
    safe = amax.float().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.linalg.vector_norm(x / safe[:, None, None], dim=(-2, -1)) * safe


def _flat(
    grafted: tuple[torch.Tensor, torch.Tensor | None], shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grafted matrix directions back in the parameters' stacked shape."""
    directions, ok = grafted
    return directions.reshape(shape), ok


class DirectionMixin:
    """Preconditioning, grafting and the first-order step of :class:`~hf_q4shampoo.optimizer.Q4Shampoo`."""

    def _step_batch(self, batch: StepBatch, g: torch.Tensor | None = None) -> None:
        """Precondition, graft and take the first-order step for one batch; members with a non-finite
        gradient or direction keep their parameter and moments and count a skipped update. ``g``: the
        gradients already stacked in fp32 (the graphed update gathers them by address)."""
        grads = batch.grads
        g = stacked_fp32(grads) if g is None else g
        directions = g
        keep = batch.finite
        if self.config.grafting == "adam" and batch.group.plan is not None:
            self._adam_graft_step(batch, g)
            return
        if self.config.grafting == "adam_filtered" and batch.group.plan is not None:
            self._filtered_graft_step(batch, g)
            return
        if batch.ready:
            g2 = g.reshape(len(grads), *batch.group.plan.matrix_shape)
            with self._stage("apply"):
                pre = self._precondition(batch, g2, batch.ready)
            with self._stage("grafting"):
                grafted, ok = self._graft(g2, pre, batch.ready, batch)
                directions = grafted.reshape(g.shape)
            if len(batch.ready) == len(grads):
                keep = keep & ok
            else:
                index = self._index(batch.ready, keep.device)
                keep = keep.index_copy(0, index, keep.index_select(0, index) & ok)
        with self._stage("first_order"):
            self._first_order_step(batch, directions, keep)
        self._count_skips(batch, keep)

    def _count_skips(self, batch: StepBatch, keep: torch.Tensor) -> None:
        """Add this step's skips to the members' ``skipped_updates`` counters (on the device)."""
        counts = batch.group.skipped
        MemberRows(batch.members, self._index, counts.device).count_skips(counts, keep)

    def _roots(self, slot: SideSlot, members: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Decoded stored roots of ``members`` for one side slot, ``(len(members) * blocks, n, n)``."""
        rows = [r for m in members for r in slot.member_rows(m)]
        storage = slot.bucket.storage  # the roots bucket: every key is a root's
        span = as_slice(rows)
        if span is not None:
            sub = {k: v[span] for k, v in storage.items()}
        else:
            index = self._index(rows, slot.bucket.device)
            sub = {k: v.index_select(0, index) for k, v in storage.items()}
        return self._form(slot.bucket.device).root(sub, dtype)

    def _precondition(self, batch: StepBatch, g2: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """``G^ = L^ G R^`` blockwise for the members at ``positions``: ``(len(positions), rows, cols)`` fp32."""
        group = batch.group
        dtype = self._apply_dtype(g2.device)
        members = [batch.members[i] for i in positions]
        sub = g2 if len(positions) == g2.shape[0] else g2[self._index(positions, g2.device)]
        out = torch.empty_like(sub)
        for ri, region in enumerate(group.plan.regions):
            slots = group.region_slots(ri)
            blocks = extract_blocks(sub, region).to(dtype)
            if "L" in slots:
                blocks = self._roots(slots["L"], members, dtype) @ blocks
            if "R" in slots:
                blocks = blocks @ self._roots(slots["R"], members, dtype)
            insert_blocks(out, region, blocks)
        return out

    def _graft(
        self, g2: torch.Tensor, pre: torch.Tensor, positions: list[int], batch: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale each preconditioned direction to its gradient's Frobenius norm; members not yet ready
        (before their first root) keep the gradient itself.

        Returns the directions and, for the members at ``positions``, whether the rescaling is finite
        (false when the gradient or the preconditioned direction has a NaN/inf entry). The norms are
        overflow-safe (:func:`_frobenius`)."""
        every = len(positions) == g2.shape[0]
        index = None if every else self._index(positions, g2.device)
        sub = g2 if every else g2[index]
        amax = batch.amax if batch.amax is None or every else batch.amax[index.to(batch.amax.device)]
        grad_norm = _frobenius(sub, amax)
        pre_norm = _frobenius(pre).add_(_GRAFT_EPS)
        ratio = grad_norm / pre_norm
        pre.mul_(ratio[:, None, None])
        ok = torch.isfinite(ratio)
        if every:
            return pre, ok
        return g2.index_copy(0, index, pre), ok

    def _adam_graft_step(self, batch: StepBatch, g: torch.Tensor) -> None:
        """``grafting="adam"`` for one batch of preconditioned members: the Adam step of the raw gradient sets
        each block's norm, momentum runs on the grafted direction (module docstring); members before their
        first root step along the Adam step itself. Skips as in :meth:`_step_batch`."""
        pre = None
        if batch.ready:
            g2 = g.reshape(len(batch.grads), *batch.group.plan.matrix_shape)
            with self._stage("apply"):
                pre = self._precondition(batch, g2, batch.ready)
            if self.param_groups[batch.group.group_index].get("maximize", False):
                pre = pre.neg_()  # the gradient is negated for the step below: keep G^ linear in it

        def graft(adam_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            if pre is None:
                return adam_step, None
            with self._stage("grafting"):
                return self._graft_blocks(
                    adam_step.reshape(len(batch.grads), *batch.group.plan.matrix_shape), pre, batch
                )

        with self._stage("first_order"):
            keep = self._first_order_step(batch, g, batch.finite, graft=graft)
        self._count_skips(batch, keep)

    def _filtered_graft_step(self, batch: StepBatch, g: torch.Tensor) -> None:
        """``grafting="adam_filtered"`` for one batch of preconditioned members: Shampoo preconditions the
        bias-corrected momentum M of the gradient, each block at the norm of the same block of the AdamW step
        ``M / (sqrt(v^) + eps)``; members before their first root take the AdamW step itself. Skips as in
        :meth:`_step_batch`. (Under ``maximize`` the moments are of the negated gradient: M^ is linear in it.)"""
        shape = (len(batch.grads), *batch.group.plan.matrix_shape)

        def graft(filtered: torch.Tensor, adam_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not batch.ready:
                return adam_step, None
            with self._stage("apply"):
                pre = self._precondition(batch, filtered.reshape(shape), batch.ready)
            with self._stage("grafting"):
                return self._graft_blocks(adam_step.reshape(shape), pre, batch)

        with self._stage("first_order"):
            keep = self._first_order_step(batch, g, batch.finite, graft=graft, filtered=True)
        self._count_skips(batch, keep)

    def _graft_blocks(self, a2: torch.Tensor, pre: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale each block of the preconditioned directions ``pre`` (members ``batch.ready``) to the Frobenius
        norm of the same block of the Adam steps ``a2`` (every member, ``(K, rows, cols)``); members not ready
        keep their Adam step. Returns the directions ``(K, rows, cols)`` and per-member flags ``(K,)`` of
        whether every rescaling was finite."""
        positions = batch.ready
        every = len(positions) == a2.shape[0]
        index = None if every else self._index(positions, a2.device)
        target = a2 if every else a2[index]
        ok = torch.ones(len(positions), dtype=torch.bool, device=a2.device)
        for region in batch.group.plan.regions:
            blocks = extract_blocks(pre, region)
            ratio = _frobenius(extract_blocks(target, region)) / _frobenius(blocks).add_(_GRAFT_EPS)
            insert_blocks(pre, region, blocks * ratio[:, None, None])
            ok &= torch.isfinite(ratio).reshape(len(positions), region.num_blocks).all(1)
        if every:
            return pre, ok
        flags = torch.ones(a2.shape[0], dtype=torch.bool, device=a2.device)
        return a2.index_copy(0, index, pre), flags.index_copy(0, index, ok)

    def _first_order_step(
        self,
        batch: StepBatch,
        directions: torch.Tensor,
        keep: torch.Tensor | None = None,
        graft: Callable | None = None,
        filtered: bool = False,
    ) -> torch.Tensor | None:
        """The AdamW / SGD step for the members of one batch (same group, shape and step), in place;
        members whose ``keep`` flag is false stay as they are. With ``graft`` (``grafting="adam"``),
        ``directions`` is the raw gradient and ``graft`` maps its Adam step to the step's directions
        (:func:`~hf_q4shampoo.first_order.adam_graft_batch_step`); with ``filtered`` too
        (``grafting="adam_filtered"``), ``graft`` maps the bias-corrected momentum and the AdamW step to the
        directions (:func:`~hf_q4shampoo.first_order.adam_filtered_batch_step`). Returns the flags the step used."""
        cfg = self.config
        group = self.param_groups[batch.group.group_index]
        if group.get("maximize", False):
            directions = directions.neg()  # not in place: for a single fp32 gradient it is p.grad itself
        params = [batch.group.params[m] for m in batch.members]
        stacked = batch.group.moments
        rows = MemberRows(batch.members, self._index, directions.device)
        moments = rows.take(stacked)
        # what the three first-order steps share
        common = dict(lr=group["lr"], weight_decay=group["weight_decay"], compile_=cfg.use_compile, keep=keep)
        common["m_map"] = cfg.first_order_m_map
        adam = dict(step=batch.step, betas=group["betas"], eps=group["eps"])
        if graft is not None:
            shape = directions.shape

            def graft_flat(*steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                return _flat(graft(*steps), shape)

            batch_step = adam_filtered_batch_step if filtered else adam_graft_batch_step
            keep = batch_step(params, directions, moments, graft_flat, **adam, **common)
        elif cfg.first_order == "adamw":
            adamw_batch_step(params, directions, moments, **adam, bits=cfg.first_order_bits, **common)
        else:
            sgd = dict(momentum=group["momentum"], nesterov=group["nesterov"], bits=cfg.first_order_bits)
            sgd_batch_step(params, directions, moments, **sgd, **common)
        rows.write_back(stacked, moments)
        return keep
