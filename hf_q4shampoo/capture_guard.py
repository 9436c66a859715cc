"""What must not happen while a step is being captured as a CUDA graph (``step_graph.py``).

A graph replays every kernel with the arguments it had at capture. Work whose inputs come from the host at
that moment (a scalar's fill, an index or pointer table copied from host memory) would be replayed with
the capture's values forever, or read host memory that has since been reused. The caches that do such
copies call :func:`refuse_in_capture` on a miss; the capture then fails cleanly before any such launch
and the step runs eagerly instead.
"""

from __future__ import annotations

import torch

__all__ = ["NotCapturable", "refuse_in_capture"]


class NotCapturable(RuntimeError):
    """Raised inside a CUDA graph capture by work that cannot be replayed as captured."""


def refuse_in_capture(device: torch.device, what: str) -> None:
    """Raise :class:`NotCapturable` if ``device``'s current stream is capturing a graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise NotCapturable(f"{what} inside a CUDA graph capture")
