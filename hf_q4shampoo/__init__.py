"""hf_q4shampoo: 4-bit Shampoo for Hugging Face Transformers.

Importing the package registers ``optim="q4shampoo"``, ``"q4adamw"`` and ``"sparse_mfac"`` with transformers (see
``integrations/registration.py``; set ``HF_Q4SHAMPOO_AUTO_REGISTER=0`` to skip). Import it before any
``HfArgumentParser`` is constructed. ``Q4ShampooTrainer`` / ``Q4ShampooTrainingArguments`` and the memory
report are loaded on first access, which imports ``transformers.Trainer``.

The ``q4shampoo`` console script imports this package before its own code runs; there nothing is imported or
registered here (every public name is loaded on first access), so ``q4shampoo --help`` and argument errors
answer at once instead of after ~10 s of torch and transformers imports. ``q4shampoo run`` registers before it
runs the script.
"""

import importlib as _importlib
import os as _os
import sys as _sys

__version__ = "0.1.0"

__all__ = [
    "Q4Shampoo",
    "Q4ShampooConfig",
    "ConfigError",
    "parse_optim_args",
    "__version__",
    "SparseMFAC",
    "SparseMFACConfig",
    "parse_sparse_mfac_optim_args",
    "Q4AdamW",
    "Q4AdamWConfig",
    "parse_q4adamw_optim_args",
    "register",
    "make_optimizer_cls_and_kwargs",
    "UnsupportedSetupError",
    "Q4ShampooTrainer",
    "Q4ShampooTrainingArguments",
    "Q4ShampooTrainerMixin",
    "Q4ShampooArgumentsMixin",
    "estimate_memory",
    "MemoryReportCallback",
    "MemoryReportMixin",
    "attach_memory_report",
    "GCFreezeCallback",
]

#: Where each public name lives (relative module).
_SOURCES = {
    "Q4Shampoo": ".optimizer",
    "Q4ShampooConfig": ".config",
    "ConfigError": ".config",
    "parse_optim_args": ".config",
    "SparseMFAC": ".sparse_mfac",
    "SparseMFACConfig": ".sparse_mfac",
    "parse_sparse_mfac_optim_args": ".sparse_mfac",
    "Q4AdamW": ".q4adamw",
    "Q4AdamWConfig": ".q4adamw",
    "parse_q4adamw_optim_args": ".q4adamw",
    "register": ".integrations.registration",
    "make_optimizer_cls_and_kwargs": ".integrations.registration",
    "UnsupportedSetupError": ".integrations.registration",
    "estimate_memory": ".estimate",
    # these import transformers' Trainer / TrainerCallback (~1 s): only when asked for
    "Q4ShampooTrainer": ".integrations.transformers",
    "Q4ShampooTrainingArguments": ".integrations.transformers",
    "Q4ShampooTrainerMixin": ".integrations.transformers",
    "Q4ShampooArgumentsMixin": ".integrations.transformers",
    "MemoryReportCallback": ".integrations.callback",
    "MemoryReportMixin": ".integrations.callback",
    "attach_memory_report": ".integrations.callback",
    "GCFreezeCallback": ".integrations.gc_freeze",
}


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(source, __name__), name)
    globals()[name] = value
    return value


def _console_script() -> bool:
    """Whether this import is the ``q4shampoo`` console script starting (its subcommands import what they need)."""
    script = _os.path.basename(_sys.argv[0]) if _sys.argv and _sys.argv[0] else ""
    return script in ("q4shampoo", "q4shampoo.exe")


if not _console_script():
    from .config import ConfigError, Q4ShampooConfig, parse_optim_args
    from .estimate import estimate_memory
    from .integrations.optimizer_args import UnsupportedSetupError, make_optimizer_cls_and_kwargs
    from .integrations.registration import register
    from .optimizer import Q4Shampoo
    from .q4adamw import Q4AdamW, Q4AdamWConfig, parse_q4adamw_optim_args
    from .sparse_mfac import SparseMFAC, SparseMFACConfig, parse_sparse_mfac_optim_args

    if _os.environ.get("HF_Q4SHAMPOO_AUTO_REGISTER", "1").strip().lower() not in ("0", "false", "no", "off"):
        try:
            register()
        except Exception as _err:  # the optimizer stays usable; `register()` called explicitly re-raises
            import warnings as _warnings

            _warnings.warn(
                f"hf_q4shampoo: could not register optim='q4shampoo' with transformers: {_err!r}", stacklevel=2
            )
