"""Accelerated versions of the pure-PyTorch hot paths, chosen at run time.

Today these are ``torch.compile`` fusions of functions written in plain torch (Inductor emits Triton
kernels on CUDA). The eager functions stay the reference: CPU always runs them, and the CUDA tests
compare both paths. Compilation is skipped on CPU, where compiling with a C++ toolchain costs more
than it saves for an optimizer step.

Shapes are static by default (dynamic-shape kernels measured ~2.5x slower for the 4-bit AdamW math
on an H100, docs/perf_notes.md v2), so a model compiles each function once per tensor shape. That
can exceed dynamo's default ``recompile_limit`` of 8 per function, after which it would silently
fall back to eager: the first compilation raises the process-wide limit to at least 64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["maybe_compiled", "mark_batch_dynamic", "RECOMPILE_LIMIT"]

RECOMPILE_LIMIT = 64
_COMPILED: dict[Callable, Callable] = {}


def maybe_compiled(fn: Callable, device: torch.device, enabled: bool) -> Callable:
    """``fn`` compiled (``fullgraph=True``, static shapes) when ``enabled`` on an accelerator, else ``fn``.

    Dimensions marked with :func:`mark_batch_dynamic` before a call stay dynamic; all others are static.
    """
    if not enabled or device.type == "cpu":
        return fn
    if fn not in _COMPILED:
        import torch._dynamo.config as dynamo_config  # noqa: PLC0415

        if getattr(dynamo_config, "recompile_limit", RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
            dynamo_config.recompile_limit = RECOMPILE_LIMIT
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def mark_batch_dynamic(*tensors: torch.Tensor) -> None:
    """Let dimension 0 (a batch of stacked matrices) vary between calls without a recompilation."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
