"""A step's update as one CUDA graph: capture it once, replay it every step that looks the same.

Why: the update of a step (decode the roots, ``L^ G R^``, grafting, the 4-bit AdamW kernels, per shape group)
is ~600 small kernel launches, the same ones every step. On a model whose forward/backward is short the host
cannot issue them as fast as the GPU runs them: on the time-to-target model they cost ~24 ms of host time
against a ~37 ms AdamW step (docs/perf_notes.md v14/v16). A replayed graph is one launch. The statistics
updates and root refreshes that fall on a step (a few factors on most steps, spread by ``refresh_spread``)
run before it and update the state in place, where the graph reads it. They change from step to step but come
back every ``update_freq`` steps: the statistics of each refresh slot are a graph of their own
(:class:`KeyedGraphs`, ``refresh.py``); the root refreshes run eagerly.

What makes an update replayable (``Q4Shampoo._update_graph`` builds the key; None means run eagerly):

* nothing host-dependent is baked in: the learning rate and the step's bias corrections are read from
  device scalars that :func:`first_order.fill_scalars` refills before each replay, so the step may ask for
  only one value of each (one learning rate and one step count for all its batches); the other
  hyper-parameters are part of the key;
* every tensor the update reads or writes has the address it had at capture: parameters, state buffers
  (updated in place, also by the eager refreshes) and the gradients, whose addresses are part of the key
  (with ``zero_grad(set_to_none=True)`` the allocator hands a training loop the same blocks every step; when
  it does not, the step runs eagerly);
* nothing in it is copied from host memory: those caches refuse a miss during a capture
  (``capture_guard.py``); an eager run of the same update just before the capture fills them.

A key seen for the first time runs the ordinary eager update (``ordinary``: while roots of new factors keep
changing the key, most keys are seen once, and the graph's own form of the work, in chunks, costs more launches);
the second time in a row it runs the graph's form eagerly (which warms every cache the capture will read); the
third time it is captured, and replayed after. A key whose capture was refused runs eagerly from then on. Only
one graph is kept: its private memory pool holds the update's transient tensors for as long as it lives.
"""

from __future__ import annotations

import statistics
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .capture_guard import NotCapturable

__all__ = ["StepGraph", "KeyedGraphs", "GraphCounts", "AddressTable", "GraphTrial"]


@dataclass
class GraphCounts:
    """How the steps ran (for benchmarks and tests)."""

    eager: int = 0  # the graph's form run eagerly
    ordinary: int = 0  # a key's first sighting, run as the ordinary eager update
    captures: int = 0
    replays: int = 0
    refused: int = 0


class GraphTrial:
    """Whether a graphed update makes *this* training loop faster, found by trying it (``cuda_graph="auto"``).

    Why: the graph saves host time (launches) and costs a little GPU time (chunked products, the gather). It pays
    where the GPU waits for the host and loses where the GPU is the bound (measured both ways, docs/perf_notes.md
    v18), and which one a loop is depends on the model, the batch and the host. How: a timing event is recorded
    on the GPU's stream at every ``step()`` entry; the time between successive ones is the loop's pace on the
    GPU's own timeline (the host's pace where the GPU waits for it, the GPU's where it does not). It is taken over
    :attr:`WINDOW` eager steps after :attr:`SKIP` (compilation, first loads), then over :attr:`WINDOW` steps whose
    update was replayed; the graph is kept when the second median is below :attr:`MARGIN` times the first. If the
    update is not replayed within :attr:`PATIENCE` steps of trying, eager. The host clock would not do: with a
    replayed update a step queues ~20 launches instead of ~600, so a host that runs ahead of a busy GPU fills the
    launch queue with many more steps and looks faster than the GPU is (seen on an H200 with a GPU-bound loop).
    Reading the events waits for the GPU once, when the trial decides.
    """

    SKIP = 5
    WINDOW = 15
    PATIENCE = 60
    MARGIN = 0.97

    def __init__(self) -> None:
        self._last: Any = None
        self._entered = 0
        self._tried_at = 0
        self._eager_pairs: list[tuple[Any, Any]] = []
        self._graph_pairs: list[tuple[Any, Any]] = []
        self.eager_ms: float | None = None
        self.graph_ms: float | None = None
        self.decision: bool | None = None

    @property
    def trying(self) -> bool:
        """Whether the update should be graphed now (during the trial's second window, or after it chose so)."""
        return self.decision if self.decision is not None else len(self._eager_pairs) >= self.WINDOW

    def enter(self, mark: Any, replayed: bool) -> bool | None:
        """Call at the start of every ``step()`` with a timing event recorded there (anything with
        ``synchronize()`` and ``elapsed_time(later)`` in ms) and whether the previous step's update was a replay;
        returns the decision (None while trying)."""
        previous, self._last = self._last, mark
        self._entered += 1
        if self.decision is not None or previous is None or self._entered <= self.SKIP + 1:
            return self.decision
        if len(self._eager_pairs) < self.WINDOW:
            self._eager_pairs.append((previous, mark))
            self._tried_at = self._entered
            return None
        if replayed:
            self._graph_pairs.append((previous, mark))
        if len(self._graph_pairs) >= self.WINDOW:
            mark.synchronize()  # the one wait: every event of both windows has run
            self.eager_ms = statistics.median(a.elapsed_time(b) for a, b in self._eager_pairs)
            self.graph_ms = statistics.median(a.elapsed_time(b) for a, b in self._graph_pairs)
            self.decision = self.graph_ms < self.MARGIN * self.eager_ms
        elif self._entered - self._tried_at > self.PATIENCE:
            self.decision = False
        if self.decision is not None:
            self._eager_pairs, self._graph_pairs, self._last = [], [], None  # the events are not needed any more
        return self.decision


def _capture(work: Callable[[], None], owner: str, what: str, whats: str, pool: Any = None):
    """Capture ``work`` as a CUDA graph (in ``pool`` when given) and replay it once, since a capture records the
    work without running it. Returns ``(graph, False)``; on failure the work runs eagerly and the result is
    ``(None, failed)``: ``failed`` False for the expected refusal (the work needs something from the host,
    ``capture_guard.py``), True for an unexpected error (a synchronising op, memory), after a warning: the caller
    stops capturing and training goes on."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            work()
    except NotCapturable:
        work()  # nothing of the failed capture ran; the host-side caches it touched are still valid
        return None, False
    except RuntimeError as error:
        warnings.warn(
            f"{owner}: capturing {what} as a CUDA graph failed ({error}); {whats} run eagerly from now on (set "
            "cuda_graph=False to skip the attempt)",
            RuntimeWarning,
            stacklevel=4,
        )
        work()
        return None, True
    graph.replay()
    return graph, False


class StepGraph:
    """One captured step and the rule that decides when to capture, replay or run eagerly."""

    def __init__(self, owner: str = "optimizer") -> None:
        self.owner = owner  # the optimizer's name, for the warning below
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None
        self._pinned: list = []
        self._seen: tuple | None = None  # the previous step's key
        self._streak = 0  # how many steps in a row have had that key
        self._refused: set[tuple] = set()
        self.disabled = False  # set by a capture that failed unexpectedly
        self.counts = GraphCounts()

    def _refuse(self, key: tuple) -> None:
        if len(self._refused) > 64:
            self._refused.clear()
        self._refused.add(key)
        self.counts.refused += 1

    def release(self) -> None:
        """Drop the captured graph (and with it its memory pool)."""
        self._graph = None
        self._key = None
        self._pinned: list = []

    def run(
        self,
        key: tuple | None,
        work: Callable[[], None],
        prepare: Callable[[], None],
        pins: Callable[[], list] = list,
        ordinary: Callable[[], None] | None = None,
    ) -> None:
        """Do this step's ``work``: replayed if ``key`` is the captured one, captured if the two previous steps had
        it too, else eagerly (as ``ordinary`` when given and the key is new, module docstring). ``prepare`` brings
        what the work reads from the device (scalars, the address table) to this step's values; it runs before
        every run of ``work`` with a key, eager ones included. ``pins`` returns what the graph must keep alive
        besides its own pool: tensors made before the capture that it reads from caches that may drop them."""
        previous, self._seen = self._seen, key
        self._streak = self._streak + 1 if key is not None and key == previous else 1
        if key is not None and key == self._key:
            prepare()
            self._graph.replay()
            self.counts.replays += 1
            return
        blocked = key is None or key in self._refused or self.disabled
        if ordinary is not None and (blocked or self._streak == 1):
            self.counts.ordinary += 1
            ordinary()
            return
        if key is not None:
            prepare()
        if blocked or self._streak < (2 if ordinary is None else 3):
            self.counts.eager += 1
            work()
            return
        self.release()  # one graph at a time: free the old pool before the new capture allocates its own
        graph, failed = _capture(work, self.owner, "the step", "the steps")
        if graph is None:
            self.disabled = self.disabled or failed
            self._refuse(key)
            return
        self._graph, self._key, self._pinned = graph, key, pins()
        self.counts.captures += 1


class KeyedGraphs:
    """Graphs of work that comes back with the same key every few steps, not on consecutive ones: the statistics
    updates of one refresh slot (``refresh_spread`` gives each step of an ``update_freq`` period its own factors).

    Why: a statistics step's eager update is ~10 ms of host time on the time-to-target model (dequantize, Gram,
    Cholesky, requantize, the rows' gathers and scatters, for each factor order), where a replay is one launch
    (docs/perf_notes.md v26). A key's first sighting runs the work eagerly (which fills every host-side cache the
    work reads, ``capture_guard.py``); its second is captured and replayed; later ones replay. At most
    :attr:`MAX_GRAPHS` are kept (the least recently used goes), all in one memory pool: the work's transient
    tensors die inside each graph and the graphs run one at a time on one stream, so they can share it. A key
    whose capture was refused runs eagerly from then on.
    """

    MAX_GRAPHS = 32

    def __init__(self, owner: str = "optimizer") -> None:
        self.owner = owner
        self._graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        self._seen: set[tuple] = set()
        self._refused: set[tuple] = set()
        self._pool: Any = None
        self.disabled = False
        self.counts = GraphCounts()

    def release(self) -> None:
        """Drop every graph, the pool and the sightings."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def run(self, key: tuple | None, work: Callable[[], None], prepare: Callable[[], None]) -> bool:
        """Do ``work`` for ``key`` (None: eagerly); ``prepare`` refills what it reads from the device before any
        run with a key. Returns whether it was a replay."""
        if key is None or self.disabled or key in self._refused:
            self.counts.eager += 1
            work()
            return False
        prepare()
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            graph.replay()
            self.counts.replays += 1
            return True
        if key not in self._seen:
            if len(self._seen) > 4 * self.MAX_GRAPHS:
                self._seen.clear()
            self._seen.add(key)
            self.counts.eager += 1
            work()
            return False
        if len(self._graphs) >= self.MAX_GRAPHS:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, failed = _capture(work, self.owner, "a refresh", "refreshes", self._pool)
        if graph is None:
            self.disabled = self.disabled or failed
            self._refused.add(key)
            self.counts.refused += 1
            return False
        self._graphs[key] = graph
        self.counts.captures += 1
        return False


class AddressTable:
    """A device table of tensor addresses (int64) that the host refills without waiting for the GPU.

    A graph reads the table at replay, so the table's own address never changes; each refill writes one of two
    pinned host buffers, in turn, and copies it to the table on the current stream. A buffer is written again
    only after the copy that last read it has run (an event), which makes the host wait only if it is two whole
    steps ahead of the GPU.
    """

    def __init__(self, size: int, device: torch.device, owner: object = None) -> None:
        self.owner = owner  # what the table was made for (the optimizer's layout key)
        self.device_table = torch.zeros(size, dtype=torch.int64, device=device)
        self._host = [torch.zeros(size, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def fill(self, addresses: list[int]) -> None:
        """Make the first ``len(addresses)`` entries of :attr:`device_table` these addresses (stream-ordered)."""
        i, self._turn = self._turn, self._turn ^ 1
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        host = self._host[i]
        host[: len(addresses)] = torch.tensor(addresses, dtype=torch.int64)
        self.device_table.copy_(host, non_blocking=True)
        event = self._copied[i] = self._copied[i] or torch.cuda.Event()
        event.record()
