"""Accelerated versions of the pure-PyTorch hot paths, chosen at run time.

Today these are ``torch.compile`` fusions of functions written in plain torch (Inductor emits Triton
kernels on CUDA). The eager functions stay the reference: CPU always runs them, and the CUDA tests
compare both paths. Compilation is skipped on CPU, where compiling with a C++ toolchain costs more
than it saves for an optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["maybe_compiled"]

_COMPILED: dict[Callable, Callable] = {}


def maybe_compiled(fn: Callable, device: torch.device, enabled: bool) -> Callable:
    """``fn`` compiled with ``fullgraph=True`` when ``enabled`` and ``device`` is an accelerator, else ``fn``.

    Default (automatic) dynamic shapes: the first shape compiles static, later shapes share one
    dynamic-shape graph, so a model with ten tensor shapes compiles about twice per function.
    """
    if not enabled or device.type == "cpu":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]
