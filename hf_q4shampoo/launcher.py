"""``q4shampoo run``: run an unmodified training script with ``--optim q4shampoo`` / ``q4adamw`` available.

    q4shampoo run SCRIPT.py [ARGS...]          # like `python SCRIPT.py ARGS...`
    q4shampoo run -m MODULE [ARGS...]          # like `python -m MODULE ARGS...`
    python -m hf_q4shampoo.launcher SCRIPT.py [ARGS...]

Under a distributed launcher, start this module on every rank and give it the script::

    torchrun --nproc_per_node 2 -m hf_q4shampoo.launcher run_clm.py --optim q4shampoo ...
    accelerate launch -m hf_q4shampoo.launcher run_clm.py --optim q4shampoo ...

How: :func:`hf_q4shampoo.register` runs first (even with ``HF_Q4SHAMPOO_AUTO_REGISTER=0``, since
registering is this command's job), then the script runs in this process through :mod:`runpy` with
Python's own ``__main__`` semantics: ``__name__ == "__main__"``, ``sys.argv = [SCRIPT, ARGS...]`` and the
script's folder first on ``sys.path``. Its exit status is returned (``sys.exit`` / argparse errors
included); an uncaught exception propagates with its traceback, as with ``python SCRIPT.py``, except a
:class:`~hf_q4shampoo.config.ConfigError` (a bad ``--optim_args`` value, raised while the script builds its
TrainingArguments): that is a usage error, printed as one line with exit status 2, as argparse does.

Under a distributed launcher (``WORLD_SIZE`` > 1) a ``Trainer`` that selects one of this package's optimizers also
freezes Python's garbage collector during training (:class:`~hf_q4shampoo.GCFreezeCallback`: one rank's full
collection, ~250 ms, stalls every rank); ``HF_Q4SHAMPOO_GC_FREEZE=0`` turns that off.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from collections.abc import Sequence

__all__ = ["main"]

USAGE = """\
usage: q4shampoo run SCRIPT.py [ARGS...]
       q4shampoo run -m MODULE [ARGS...]

Run a training script (any script that parses TrainingArguments with HfArgumentParser, e.g.
transformers' run_clm.py / run_glue.py) with `--optim q4shampoo` and `--optim q4adamw` registered,
unmodified. Options go in --optim_args, e.g. --optim_args "update_freq=10,root_freq=50" (q4shampoo) or
--optim_args "variant=factor" (q4adamw, paper 3's 4-bit AdamW / 4-bit Factor).

Distributed: torchrun --nproc_per_node N -m hf_q4shampoo.launcher SCRIPT.py [ARGS...]
             accelerate launch -m hf_q4shampoo.launcher SCRIPT.py [ARGS...]"""


def _exit_status(code: object) -> int:
    """The process exit status Python would give ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _module_found(name: str) -> bool:
    """Whether ``python -m name`` would find ``name`` (the working directory first on ``sys.path``, as there)."""
    saved_path = sys.path[:]
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package, or an empty / relative name
        return False
    finally:
        sys.path[:] = saved_path


def _run(target: str, args: list[str], as_module: bool) -> int:
    from hf_q4shampoo.config import ConfigError

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        sys.argv = [target, *args]  # with -m, run_module puts the module's file in argv[0]
        if as_module:
            sys.path.insert(0, os.getcwd())  # as `python -m` does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))  # as `python SCRIPT.py` does
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        return _exit_status(exc.code)
    except ConfigError as exc:
        print(f"q4shampoo run: error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Register ``q4shampoo``, then run ``SCRIPT.py ARGS...`` (or ``-m MODULE ARGS...``) as ``__main__``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    as_module = argv[0] == "-m"
    if as_module:
        if len(argv) < 2:
            print(f"q4shampoo run: -m needs a module name\n\n{USAGE}", file=sys.stderr)
            return 2
        target, args = argv[1], argv[2:]
        if not _module_found(target):
            print(f"q4shampoo run: no module named {target!r}", file=sys.stderr)
            return 1
    else:
        target, args = argv[0], argv[1:]
        if not os.path.isfile(target):
            print(f"q4shampoo run: no such script: {target!r}\n\n{USAGE}", file=sys.stderr)
            return 2

    from .integrations.registration import register

    register()
    from .integrations.gc_freeze import attach_to_new_trainers, launcher_wants_gc_freeze

    if launcher_wants_gc_freeze():  # one rank's full garbage collection stalls every rank (perf_notes v22)
        attach_to_new_trainers()
    return _run(target, args, as_module)


if __name__ == "__main__":
    sys.exit(main())
