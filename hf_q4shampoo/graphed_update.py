"""A step's update run as a replayed CUDA graph (``cuda_graph=True``, or ``"auto"`` where a trial finds it faster):
which batches it covers, its key, and what is refreshed before each replay (:class:`GraphedUpdateMixin`).
``step_graph.py`` decides when to capture.

What the graph reads that changes from step to step, and how:

* the gradients: through a device table of their addresses (``triton_gather``), refilled before each replay
  (:class:`~hf_q4shampoo.step_graph.AddressTable`), so ``zero_grad(set_to_none=True)`` handing out new tensors
  every step does not invalidate it;
* the learning rate and the bias corrections: device scalars (``first_order.fill_scalars``).

Its memory: the graph's private pool keeps the update's transient tensors between steps, so the graphed update
works through each shape group in chunks of at most :data:`CHUNK_NUMEL` entries (about eight fp32 copies of a
chunk are alive at once), and matrices larger than :data:`MAX_MEMBER_NUMEL` (GPT-2's 50,257-word embedding) are
updated eagerly after the replay, as are the batches that take the torch math rather than the fused or Triton
AdamW (the fp32 moments of a bf16 model's small tensors: that math takes host values). Q4Shampoo's chunks round
differently from the whole group's batched products and norms in the last bits, so its graphed run equals its own
eager runs bit for bit, not ``cuda_graph=False``'s; Q4AdamW's 4bit step is elementwise per member and equals
``cuda_graph=False`` (its factored v's row and column sums do not, for chunked groups).

A mixin of :class:`~hf_q4shampoo.optimizer.Q4Shampoo` and :class:`~hf_q4shampoo.q4adamw.Q4AdamW`: it reads
``config`` (``cuda_graph``, ``use_compile``), ``param_groups`` and ``stage_timer`` when there is one, and calls two
hooks of the optimizer: ``_graph_config_ok()`` (whether its options and process setup allow a graphed update at
all) and ``_step_batch(batch, g)`` (one batch's update, ``g`` its gradients already gathered in fp32).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from . import triton_kernels
from .distributed import is_dtensor
from .first_order import adam_scalars, adamw_kernel, fill_scalars
from .layout import Layout, StepBatch
from .step_graph import AddressTable, GraphTrial, StepGraph
from .triton_gather import SOURCE_DTYPES, stack_by_address

__all__ = [
    "GraphedUpdateMixin",
    "flag_finite",
    "graphable_grads",
    "gather_with_amax",
    "CHUNK_NUMEL",
    "MAX_MEMBER_NUMEL",
    "GRAPH_ATTRIBUTES",
]

_logger = logging.getLogger(__name__)

#: entries per chunk of a shape group inside the graph (4M: ~16 MiB per fp32 copy)
CHUNK_NUMEL = 1 << 22
#: matrices with more entries than this are updated eagerly, outside the graph
MAX_MEMBER_NUMEL = 1 << 23
#: what the mixin keeps on the optimizer (device objects: a copy or an unpickled optimizer makes its own)
GRAPH_ATTRIBUTES = (
    "_step_graph",
    "_grad_addresses",
    "_graph_trial",
    "_graph_trial_done",
    "_replays_seen",
    "_refresh_graphs",
    "_stats_addresses",
    "_refresh_settled",
)


def flag_finite(batches: list[StepBatch]) -> None:
    """One multi-tensor max-abs per batch; the flags stay on the device (no sync)."""
    for b in batches:
        b.amax = torch.stack(torch._foreach_norm(b.grads, ord=math.inf))
        b.finite = torch.isfinite(b.amax)


def gather_with_amax(table: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients whose addresses ``table`` holds (shaped and typed as ``batch``'s), stacked in fp32, and each
    one's max |entry| (what a graph flags non-finite gradients by)."""
    first = batch.grads[0]
    g = stack_by_address(table, tuple(first.shape), first.dtype)
    return g, torch.linalg.vector_norm(g, ord=math.inf, dim=tuple(range(1, g.dim())))


def _chunks(batch: StepBatch) -> list[tuple[int, StepBatch]]:
    """``(first member position, sub-batch)`` pieces of at most :data:`CHUNK_NUMEL` entries (one member at least)."""
    per = max(1, CHUNK_NUMEL // batch.grads[0].numel())
    if len(batch.members) <= per:
        return [(0, batch)]
    out = []
    for a in range(0, len(batch.members), per):
        z = min(a + per, len(batch.members))
        sub = StepBatch(batch.group, batch.members[a:z], batch.step, batch.grads[a:z])
        sub.ready = [i - a for i in batch.ready if a <= i < z]
        out.append((a, sub))
    return out


def _trial_words(trial: GraphTrial) -> tuple[str, str]:
    """The trial's decision in words, for the log."""
    if trial.graph_ms is None:
        return "dropped", "no replayed steps to time"
    verb = "kept" if trial.decision else "dropped"
    return verb, f"median step {trial.eager_ms:.1f} ms eager, {trial.graph_ms:.1f} ms replayed"


def graphable_grads(batch: StepBatch) -> bool:
    """Whether a graph can gather the batch's gradients by address (``triton_gather``): contiguous, of one
    source dtype, and no matrix so large that its transients would stay in the graph's pool."""
    first = batch.grads[0]
    return (
        first.dtype in SOURCE_DTYPES
        and first.numel() <= MAX_MEMBER_NUMEL
        and all(g.dtype == first.dtype and g.is_contiguous() for g in batch.grads)
    )


class GraphedUpdateMixin:
    """An optimizer's update, graphed where it can be (module docstring)."""

    #: the optimizer's name in log lines and warnings
    GRAPH_OWNER = "optimizer"

    def _graph_config_ok(self) -> bool:
        """Whether the optimizer's options and process setup allow a graphed update (the hook each one defines)."""
        raise NotImplementedError

    def _graph_trial_step(self) -> None:
        """At the start of ``step()``: ``cuda_graph="auto"`` tries the graph in the first steps (GraphTrial)."""
        if self.config.cuda_graph != "auto" or "_graph_trial_done" in self.__dict__:
            return
        trial = self.__dict__.get("_graph_trial")
        if trial is None:
            # nothing to try off CUDA, where _update_graph never graphs, or under FSDP2 (DTensor parameters: the
            # graphed update is not tested there)
            params = [p for g in self.param_groups for p in g["params"]]
            graphable = self._graph_config_ok()
            if not params or params[0].device.type != "cuda" or not graphable or any(map(is_dtensor, params)):
                self._graph_trial_done = True
                return
            trial = self._graph_trial = GraphTrial()
            self._replays_seen = 0
        counts = self._graph_runner().counts
        replayed, self._replays_seen = counts.replays > self._replays_seen, counts.replays
        # a step whose statistics graph was seen for the first time or captured is not a sample of the graphed pace
        replayed = replayed and self.__dict__.get("_refresh_settled", True)
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        decision = trial.enter(mark, replayed)
        if decision is not None:
            if not decision:  # the graphs and their pools go: the update's and the statistics' (refresh.py)
                self._graph_runner().release()
                refresh = self.__dict__.get("_refresh_graphs")
                if refresh is not None:
                    refresh.release()
            self._graph_trial_done = True
            _logger.info("%s: cuda_graph=auto %s the graphed update (%s)", self.GRAPH_OWNER, *_trial_words(trial))

    def graph_info(self) -> dict[str, Any] | None:
        """How the updates ran with the CUDA graph (``cuda_graph`` true or "auto"; None before any graphed
        step or off CUDA): eager / ordinary / captured / replayed step counts, refused captures, and for
        "auto" the trial's decision (``kept``) with its median step periods (``eager_ms``, ``graph_ms``); Q4Shampoo's
        statistics graphs' counts under ``statistics_graphs`` once one ran."""
        runner = self.__dict__.get("_step_graph")
        if runner is None:
            return None
        info: dict[str, Any] = dataclasses.asdict(runner.counts)
        trial = self.__dict__.get("_graph_trial")
        if trial is not None:
            info.update(kept=trial.decision, eager_ms=trial.eager_ms, graph_ms=trial.graph_ms)
        refresh = self.__dict__.get("_refresh_graphs")
        if refresh is not None:
            info["statistics_graphs"] = dataclasses.asdict(refresh.counts)
        return info

    def _graph_wanted(self) -> bool:
        """``cuda_graph`` True, or "auto" while the trial tries the graph and once it chose to keep it."""
        setting = self.config.cuda_graph
        if setting == "auto":
            trial = self.__dict__.get("_graph_trial")
            return trial is not None and trial.trying
        return setting is True

    def _run_update(self, layout: Layout, batches: list[StepBatch]) -> None:
        """Precondition, graft and step every batch: the graphed ones through the CUDA graph (which makes its own
        finite flags), the rest eagerly."""
        graphed, key, prepare = self._update_graph(layout, batches)
        in_graph = {id(b) for b, _ in graphed}
        eager = [b for b in batches if id(b) not in in_graph]
        if graphed:
            table = self._grad_addresses.device_table
            work = lambda: self._graphed_work(graphed, table)  # noqa: E731
            ordinary = lambda: self._eager_update([b for b, _ in graphed])  # noqa: E731
            self._graph_runner().run(key, work, prepare, triton_kernels.pointer_tables, ordinary)
        self._eager_update(eager)

    def _eager_update(self, batches: list[StepBatch]) -> None:
        """The ordinary update of ``batches``, one whole batch at a time (flagging those the refreshes did not)."""
        unflagged = [b for b in batches if b.finite is None]
        if unflagged:
            flag_finite(unflagged)
        for b in batches:
            self._step_batch(b)

    def _graphed_work(self, graphed: list[tuple[StepBatch, int]], table: torch.Tensor) -> None:
        """What the graph holds: for each batch, chunk by chunk, gather the gradients by address, flag the
        non-finite ones and take the update."""
        for batch, offset in graphed:
            for a, sub in _chunks(batch):
                g, sub.amax = gather_with_amax(table[offset + a : offset + a + len(sub.members)], batch)
                sub.finite = torch.isfinite(sub.amax)
                self._step_batch(sub, g)

    def _graph_runner(self) -> StepGraph:
        runner = self.__dict__.get("_step_graph")
        if runner is None:
            runner = self._step_graph = StepGraph(self.GRAPH_OWNER)
        return runner

    def _address_table(
        self, layout: Layout, device: torch.device, name: str = "_grad_addresses", readers: Any = None
    ) -> AddressTable:
        """The gradients' address table ``name`` of this layout; a new one releases ``readers`` (the graphs that read
        the old; by default the update's)."""
        table = self.__dict__.get(name)
        if table is None or table.owner != layout.key or table.device_table.device != device:
            runner = self._graph_runner() if readers is None else readers
            runner.release()
            table = AddressTable(sum(g.size for g in layout.groups), device, owner=layout.key)
            setattr(self, name, table)
        return table

    def _graphs_enabled(self, batches: list[StepBatch]) -> bool:
        """Whether this step's work may run as CUDA graphs at all: wanted (``cuda_graph``, the trial), on CUDA,
        no stage timers (they time eager stages), and options and process setup that allow it."""
        device = batches[0].grads[0].device
        if not self._graph_wanted() or device.type != "cuda" or getattr(self, "stage_timer", None) is not None:
            return False
        return self._graph_config_ok()

    def _update_graph(
        self, layout: Layout, batches: list[StepBatch]
    ) -> tuple[list[tuple[StepBatch, int]], tuple | None, Callable[[], None]]:
        """The batches the graph covers with their offsets into the address table, its key and what to do before
        it runs; nothing when the step cannot be graphed (the conditions are ``step_graph.py``'s)."""
        cfg: Any = self.config
        device = batches[0].grads[0].device
        nothing = ([], None, lambda: None)
        if not self._graphs_enabled(batches):
            return nothing
        groups = [self.param_groups[gi] for gi in sorted({b.group.group_index for b in batches})]
        if any(isinstance(g["lr"], torch.Tensor) or g.get("maximize", False) for g in groups):
            return nothing
        lrs, betas, steps = {g["lr"] for g in groups}, {tuple(g["betas"]) for g in groups}, {b.step for b in batches}
        if len(lrs) != 1 or len(betas) != 1 or len(steps) != 1:  # one value per device scalar (step_graph.py)
            return nothing
        if any(b.grads[0].device != device for b in batches):
            return nothing
        # the fused and Triton AdamW read the lr and bias corrections from device scalars; the torch math (e.g. the
        # fp32 moments of a bf16 model's small tensors) takes host values: those batches run eagerly beside the graph
        chosen = [
            b
            for b in batches
            if graphable_grads(b) and adamw_kernel(b.group.params, b.group.moments, cfg.use_compile) != "torch"
        ]
        if not chosen:
            return nothing
        table = self._address_table(layout, device)
        graphed, offset = [], 0
        for b in chosen:
            graphed.append((b, offset))
            offset += len(b.grads)
        beta_pair = betas.pop()
        key = (
            layout.key,
            id(table),
            tuple((g["weight_decay"], g["eps"]) for g in groups),
            beta_pair,
            tuple((id(b.group), tuple(b.members), tuple(b.ready), b.grads[0].dtype) for b in chosen),
            tuple(p.data_ptr() for b in chosen for p in b.group.params),
        )
        values = adam_scalars(lrs.pop(), steps.pop(), beta_pair)
        addresses = [g.data_ptr() for b in chosen for g in b.grads]

        def prepare() -> None:
            fill_scalars(device, values)
            table.fill(addresses)

        return graphed, key, prepare
