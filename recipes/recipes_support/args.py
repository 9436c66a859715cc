"""Argument parsing shared by the recipes: ``HfArgumentParser`` plus recipe defaults.

A recipe passes its own defaults for ``TrainingArguments`` fields (``optim="q4shampoo"``, a small
number of epochs, ``do_train``/``do_eval`` on, ...) so that running it with no argument trains on its
offline default. Anything on the command line or in the JSON file wins over these defaults.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from hf_q4shampoo.integrations.optimizer_args import is_q4shampoo_optim

__all__ = [
    "HubArguments",
    "RecipeArgumentError",
    "all_if_zero",
    "parse_recipe_args",
    "apply_q4shampoo_defaults",
    "check_data_source",
    "hub_kwargs",
    "run_main",
]

logger = logging.getLogger(__name__)


class RecipeArgumentError(ValueError):
    """Arguments that parse but do not make sense together (the message says which and why)."""


@dataclass
class HubArguments:
    """The ``from_pretrained`` options every recipe's ``ModelArguments`` carries (its base class: said once)."""

    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloads from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the one from `hf auth login`)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


def all_if_zero(args: object, *names: str) -> None:
    """``--max_train_samples 0`` (and the other ``names``) means all, in every recipe: the command line cannot
    say None. Negative values are refused."""
    for name in names:
        value = getattr(args, name)
        if value == 0:
            setattr(args, name, None)
        elif value is not None and value < 0:
            raise RecipeArgumentError(f"--{name} must be positive (or 0 for all), got {value}.")


def parse_recipe_args(
    dataclass_types: Sequence[type],
    defaults: dict[str, Any] | None = None,
    argv: Sequence[str] | None = None,
) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``) into instances of ``dataclass_types``.

    As in transformers' example scripts, a single argument ending in ``.json`` is read as a config file
    (``HfArgumentParser.parse_json_file`` semantics: unknown keys are refused); otherwise the command
    line is parsed. ``defaults`` override the dataclass defaults in both cases and are overridden by
    what the user gives.
    """
    defaults = dict(defaults or {})
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(tuple(dataclass_types))
    if len(argv) == 1 and argv[0].endswith(".json"):
        path = Path(argv[0])
        if not path.is_file():
            raise RecipeArgumentError(f"config file {path} does not exist.")
        with path.open(encoding="utf-8") as handle:
            values = json.load(handle)
        if not isinstance(values, dict):
            raise RecipeArgumentError(f"{path} must hold one JSON object of argument names to values.")
        return parser.parse_dict({**defaults, **values})
    parser.set_defaults(**defaults)
    # no `<script>.args` lookup: a recipe's behaviour should only depend on what the user passes.
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def apply_q4shampoo_defaults(training_args: TrainingArguments, optim_args: str) -> None:
    """Give Q4Shampoo the recipe's ``--optim_args`` when it runs and the user passed none.

    The optimizer's defaults (statistics every 100 steps, roots every 500) suit runs of many thousand
    steps; a recipe of a few hundred steps would otherwise train with no preconditioner at all. Other
    optimizers are left untouched: some of transformers' handlers read ``optim_args`` too.
    """
    if is_q4shampoo_optim(training_args.optim) and not training_args.optim_args:
        training_args.optim_args = optim_args
        logger.info("--optim q4shampoo with the recipe's default --optim_args %s", optim_args)


def check_data_source(
    dataset_name: str | None,
    train: str | Sequence[str] | None,
    validation: str | None,
    train_flag: str = "--train_file",
) -> None:
    """Refuse a Hub dataset together with local files, and a validation file without training files."""
    if dataset_name and (train or validation):
        raise RecipeArgumentError(f"give either --dataset_name or {train_flag}/--validation_file, not both.")
    if validation and not train:
        raise RecipeArgumentError(f"--validation_file needs {train_flag}.")


def hub_kwargs(model_args: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keywords every recipe's ``ModelArguments`` carries (cache, revision, token, ...)."""
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def run_main(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Call a recipe's ``main()`` and turn the errors a user can fix into one message and exit status 2.

    Missing offline assets (:class:`~recipes_support.assets.MissingAssetError`), inconsistent
    arguments (:class:`RecipeArgumentError`), bad ``--optim_args`` (``ConfigError``) and arguments the
    parser does not know print their message without a traceback; anything else is a bug and keeps its
    traceback.
    """
    from hf_q4shampoo import ConfigError

    from .assets import MissingAssetError

    try:
        main(None)
    except (MissingAssetError, RecipeArgumentError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as err:
        if "not used by the HfArgumentParser" not in str(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
