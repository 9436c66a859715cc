"""Compile the Triton kernels a piece of code will launch in parallel instead of one after the other.

Why: a user's first run (empty Triton cache) compiles every kernel specialisation the optimizer uses at its
first step. Each compilation is mostly waiting on subprocesses (``ptxas`` for the kernel, the C compiler for
its launcher): ~4 of the ~9 s of GPT-2 small's first step (docs/perf_notes.md v13). Done in a thread pool
those waits overlap.

How: Triton compiles a kernel when it is first launched, and only then knows its specialisation (argument
dtypes, which integers are 1 or multiples of 16, pointer alignment). So :func:`compile_in_parallel` runs the
code once as a *dry run* with Triton's ``jit_cache_hook`` set: every launch of one of this package's kernels
that would compile is recorded and skipped (the hook's documented way to veto a compilation). The recorded
specialisations are then compiled in a thread pool through Triton's ``AsyncCompileMode`` and
``JITFunction.preload``, and their launchers built in the same pool; after that the kernels are in Triton's
in-process cache and their real launches compile nothing. Measured (one H200, 16 host cores): GPT-2 small's first
step 10.2 s compiling one by one, 4.3 s in parallel (docs/perf_notes.md v16).

The dry run must therefore be free of side effects that matter: its kernels do not run, so whatever they
would have written holds garbage. The first step's warm-ups (``warmup.py``) qualify: they work on copies.
Other threads' launches of this package's kernels during the dry run would be skipped too; a training loop
steps its optimizer from one thread.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .triton_common import HAS_TRITON

__all__ = ["compile_in_parallel", "ENABLED"]

#: Tests switch this off to check the serial path (the warm-ups then run for real and compile one by one).
ENABLED = True


def _machinery():
    """Triton's hook knob and async-compile mode, or None where this Triton lacks them."""
    if not HAS_TRITON:
        return None
    try:
        from triton import knobs
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    if not hasattr(knobs.runtime, "jit_cache_hook"):
        return None
    return knobs, AsyncCompileMode


def _record_launches(knobs, dry_run: Callable[[], None]) -> dict[tuple, tuple]:
    """Run ``dry_run`` with this package's compiling launches recorded and skipped: ``{(kernel id, key):
    (JITFunction, device index, specialisation JSON)}``."""
    records: dict[tuple, tuple] = {}
    previous = knobs.runtime.jit_cache_hook
    package = __name__.rpartition(".")[0]

    def record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's names)
        jit = fn.jit_function
        if not fn.module.startswith(package):  # someone else's kernel: whatever was there decides
            if previous is None:
                return None
            return previous(
                key=key,
                repr=repr,
                fn=fn,
                compile=compile,
                is_manual_warmup=is_manual_warmup,
                already_compiled=already_compiled,
            )
        records.setdefault((id(jit), key), (jit, compile["device"], compile["specialization_data"]))
        return True  # skip: compiled below, in parallel

    knobs.runtime.jit_cache_hook = record
    try:
        dry_run()
    finally:
        knobs.runtime.jit_cache_hook = previous
    return records


def _workers(count: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(count, cores))


def compile_in_parallel(dry_run: Callable[[], None]) -> bool:
    """Run ``dry_run`` with this package's Triton launches skipped, then compile what they would have compiled,
    in parallel. Returns False when nothing was done (no CUDA or no Triton, an older Triton, or
    :data:`ENABLED` off): the caller then runs its code for real, compiling as it goes.

    Any Triton kernel the dry run needed is in Triton's cache afterwards, with its launcher built. A failure of
    the parallel compilation (an internal Triton interface that moved, or a kernel that does not compile) is
    reported as a warning and returns False, so the caller's real run compiles serially and raises any real
    compilation error where it happens.
    """
    machinery = _machinery() if ENABLED and torch.cuda.is_available() else None
    if machinery is None:
        return False
    knobs, async_compile_mode = machinery
    records = _record_launches(knobs, dry_run)
    if not records:
        return True
    try:
        with ThreadPoolExecutor(_workers(len(records)), thread_name_prefix="q4shampoo-compile") as pool:
            pending = []
            with async_compile_mode(pool):
                for jit, device, data in records.values():
                    with torch.cuda.device(device):  # preload compiles for the current device
                        pending.append((jit.preload(data), device))  # submitted; leaving the mode waits for all

            def build_launcher(item) -> None:  # the launcher's C compilation and the module load
                future, device = item
                with torch.cuda.device(device):
                    future.result()._init_handles()

            list(pool.map(build_launcher, pending))
    except Exception as error:  # the acceleration failed, not necessarily the kernels
        warnings.warn(
            f"Q4Shampoo: compiling the first step's Triton kernels in parallel failed ({error!r}); "
            "they compile one by one instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
