"""hf_q4shampoo: 4-bit Shampoo for Hugging Face Transformers.

Importing the package registers ``optim="q4shampoo"`` and ``optim="sparse_mfac"`` with transformers (see
``integrations/registration.py``; set ``HF_Q4SHAMPOO_AUTO_REGISTER=0`` to skip). Import it before any
``HfArgumentParser`` is constructed. ``Q4ShampooTrainer`` / ``Q4ShampooTrainingArguments`` are loaded on
first access, which imports ``transformers.Trainer``.
"""

import os as _os

from .config import ConfigError, Q4ShampooConfig, parse_optim_args
from .integrations.registration import UnsupportedSetupError, make_optimizer_cls_and_kwargs, register
from .optimizer import Q4Shampoo
from .sparse_mfac import SparseMFAC, SparseMFACConfig, parse_sparse_mfac_optim_args

__version__ = "0.1.0"

__all__ = [
    "Q4Shampoo", "Q4ShampooConfig", "ConfigError", "parse_optim_args", "__version__",
    "SparseMFAC", "SparseMFACConfig", "parse_sparse_mfac_optim_args",
    "register", "make_optimizer_cls_and_kwargs", "UnsupportedSetupError",
    "Q4ShampooTrainer", "Q4ShampooTrainingArguments", "Q4ShampooTrainerMixin", "Q4ShampooArgumentsMixin",
    "estimate_memory", "MemoryReportCallback", "MemoryReportMixin", "attach_memory_report",
]

# --- Memory estimate and report (issue #4) -----------------------------------------------------
from .estimate import estimate_memory  # noqa: E402  (light: no transformers import)

_LAZY_CALLBACK_NAMES = ("MemoryReportCallback", "MemoryReportMixin", "attach_memory_report")

# --- Transformers integration (issue #3) -------------------------------------------------------
_LAZY_TRAINER_NAMES = ("Q4ShampooTrainer", "Q4ShampooTrainingArguments", "Q4ShampooTrainerMixin", "Q4ShampooArgumentsMixin")


def __getattr__(name: str):
    if name in _LAZY_CALLBACK_NAMES:  # imports transformers' TrainerCallback: only when asked for
        from .integrations import callback as _cb

        return getattr(_cb, name)
    if name in _LAZY_TRAINER_NAMES:  # importing Trainer costs ~1 s: only when asked for
        from .integrations import transformers as _hf

        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if _os.environ.get("HF_Q4SHAMPOO_AUTO_REGISTER", "1").strip().lower() not in ("0", "false", "no", "off"):
    try:
        register()
    except Exception as _err:  # the optimizer stays usable; `register()` called explicitly re-raises
        import warnings as _warnings

        _warnings.warn(f"hf_q4shampoo: could not register optim='q4shampoo' with transformers: {_err!r}")
