"""Preconditioner maintenance on a side CUDA stream (``overlap_refresh``): statistics updates and root refreshes
run after the step's own update, on a second stream, so the GPU can interleave them with the next
forward/backward instead of running them in line.

The ordering contract, per device:

* the side stream starts after everything the default stream has queued so far (the gradients, their finite
  flags, and the step's reads of the current roots): :meth:`SideStreams.run` makes it wait first;
* the default stream waits for the side stream before it touches the preconditioner state again: at the next
  ``step()``, ``state_dict()``, ``load_state_dict()`` (:meth:`SideStreams.join`); a forward/backward queued in
  between does not wait, which is where the overlap comes from;
* tensors made on the default stream and read on the side stream (the gradients, the finite flags) are marked
  with ``record_stream`` so the caching allocator does not hand their memory to the next forward while the side
  stream still reads it.

On CPU (and without CUDA) :meth:`SideStreams.run` is a plain context: the same work runs in line, in the same
order, so the results do not depend on the device's streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["SideStreams"]


class SideStreams:
    """One side stream per CUDA device, created at first use."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    @contextlib.contextmanager
    def run(self, devices: Iterable[torch.device], used: Iterable[torch.Tensor]) -> Iterator[None]:
        """Queue the body on the side stream of every CUDA device in ``devices`` (in line elsewhere).

        ``used``: tensors allocated on the default stream that the body reads (recorded on the side stream).
        """
        cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
        with contextlib.ExitStack() as stack:
            for device in cuda:
                side = self._stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                stack.enter_context(torch.cuda.stream(side))
            yield
        for t in used:
            side = self._streams.get(t.device)
            if side is not None:
                t.record_stream(side)

    def join(self) -> None:
        """Make each device's current stream wait for its side stream's queued work (no host synchronisation)."""
        for device, side in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(side)

    def synchronize(self) -> None:
        """Block the host until every side stream is idle (for code that reads the state on the host)."""
        for side in self._streams.values():
            side.synchronize()
