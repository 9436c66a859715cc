"""Current and peak memory of the training device: :class:`MemoryProbe` (CUDA / XPU / MPS allocators, CPU RSS)."""

from __future__ import annotations

import re
import sys
from typing import Any

import torch

__all__ = ["MemoryProbe"]


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _ru_maxrss_bytes() -> int:
    try:
        import resource
    except ImportError:  # Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


class MemoryProbe:
    """Current and peak memory of the training device.

    CUDA / XPU: the caching allocator's allocated bytes and their peak. MPS: allocated bytes; the peak
    is the largest value sampled (MPS keeps no peak). CPU: the process's resident set (RSS); the peak is
    the kernel's high-water mark (``VmHWM``), which :meth:`reset_peak` resets through
    ``/proc/self/clear_refs`` on Linux; elsewhere it is ``ru_maxrss``, the peak since process start.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device if device is not None else "cpu")
        self.kind = self.device.type if self.device.type in ("cuda", "xpu", "mps") else "rss"
        self.peak_since = "process_start"
        self._sampled_peak = 0

    @property
    def log_key(self) -> str:
        return f"peak_{self.kind}_mib"

    def _backend(self) -> Any:
        return getattr(torch, self.kind)

    def reset_peak(self) -> None:
        """Start the peak afresh (called at train begin)."""
        if self.kind in ("cuda", "xpu"):
            self._backend().reset_peak_memory_stats(self.device)
            self.peak_since = "train_begin"
        elif self.kind == "mps":
            self.peak_since = "train_begin"
        else:
            try:  # "5" resets the peak RSS (Linux >= 4.0, Documentation/filesystems/proc.rst)
                with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
                self.peak_since = "train_begin"
            except OSError:
                self.peak_since = "process_start"
        self._sampled_peak = 0
        self.sample()

    def current(self) -> int:
        if self.kind in ("cuda", "xpu"):
            return int(self._backend().memory_allocated(self.device))
        if self.kind == "mps":
            return int(torch.mps.current_allocated_memory())
        rss = _proc_status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            return _ru_maxrss_bytes()

    def sample(self) -> int:
        """Read the current value and fold it into the sampled peak."""
        now = self.current()
        self._sampled_peak = max(self._sampled_peak, now)
        return now

    def peak(self) -> int:
        if self.kind in ("cuda", "xpu"):
            backend = int(self._backend().max_memory_allocated(self.device))
        elif self.kind == "mps":
            backend = 0
        else:
            hwm = _proc_status_kib("VmHWM")
            backend = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()
        return max(backend, self._sampled_peak)
