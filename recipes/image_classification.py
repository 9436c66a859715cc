#!/usr/bin/env python
# Copyright 2026 The hf_q4shampoo developers. Licensed under the Apache License, Version 2.0.
"""Train an image classifier from scratch (ResNet or ViT) with Q4Shampoo (or any ``--optim``).

The model is built from ``ResNetConfig`` or ``ViTConfig`` with the sizes given by flags (the 4-bit
Shampoo papers train vision models from scratch too). With no dataset named it trains on Fashion-MNIST
from Debian's ``dataset-fashion-mnist`` package (``apt-get install -y dataset-fashion-mnist``), with
random crops and flips, and reports accuracy on the 10,000 test images:

    python recipes/image_classification.py
    python recipes/image_classification.py --model_type vit --patch_size 4

Any Hub image dataset with an image and a label column works when the Hub is reachable (images are
resized to ``--image_size``; no torchvision needed), as does a pretrained Hub checkpoint:

    python recipes/image_classification.py --dataset_name cifar10 --image_column_name img \
        --image_size 32 --num_channels 3

Every ``TrainingArguments`` flag is accepted; a single ``.json`` argument is read as a config file.
"""

import os

# OpenMP threads that spin while they wait collapse when another process shares the cores (a 2-core CI
# machine ran this recipe 5x slower); must be set before torch loads. Export another value to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

import hf_q4shampoo  # noqa: F401  (registers --optim q4shampoo; must run before HfArgumentParser is built)
from hf_q4shampoo import Q4ShampooTrainer
from recipes_support.args import (
    HubArguments,
    RecipeArgumentError,
    all_if_zero,
    apply_q4shampoo_defaults,
    hub_kwargs,
    parse_recipe_args,
    run_main,
)
from recipes_support.assets import fashion_mnist_dir
from recipes_support.data import encode_class_labels, load_hub_or_files, take_dataset
from recipes_support.metrics import classification_metrics
from recipes_support.training import apply_runtime_defaults, setup_logging, train_and_evaluate
from recipes_support.vision import (
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    HubImageDataset,
    ImageTransform,
    TensorImageDataset,
    collate_images,
    load_fashion_mnist,
)

logger = logging.getLogger(__name__)

#: Statistics every 10 steps and roots every 50: the default run is a few hundred steps, and the
#: optimizer's defaults (100 / 500) would leave it without a preconditioner.
DEFAULT_Q4_OPTIM_ARGS = "update_freq=10,root_freq=50"

RECIPE_DEFAULTS = {
    "output_dir": "outputs/image_classification",
    "optim": "q4shampoo",
    "do_train": True,
    "do_eval": True,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 20,
    "weight_decay": 0.05,
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 42,
}


@dataclass
class ModelArguments(HubArguments):
    """The architecture built from scratch (or a pretrained checkpoint)."""

    model_type: str = field(default="resnet", metadata={"help": "Architecture.", "choices": ["resnet", "vit"]})
    image_size: int = field(default=28, metadata={"help": "Images are resized to image_size x image_size."})
    num_channels: int = field(default=1, metadata={"help": "1 (grey) or 3 (RGB); images are converted to it."})
    # ResNet
    embedding_size: int = field(default=32, metadata={"help": "ResNet: channels of the stem."})
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128], metadata={"help": "ResNet: stage widths."})
    depths: list[int] = field(default_factory=lambda: [1, 1, 1], metadata={"help": "ResNet: blocks per stage."})
    # ViT
    patch_size: int = field(default=4, metadata={"help": "ViT: patch side (must divide image_size)."})
    hidden_size: int = field(default=128, metadata={"help": "ViT: width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT: transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "ViT: attention heads."})
    intermediate_size: int = field(default=256, metadata={"help": "ViT: MLP width."})
    # Hub
    config_name: str | None = field(default=None, metadata={"help": "Build from this Hub/local config instead."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Fine-tune this pretrained checkpoint."})

    def __post_init__(self) -> None:
        if self.num_channels not in (1, 3):
            raise RecipeArgumentError(f"--num_channels must be 1 or 3, got {self.num_channels}.")
        if self.model_type == "vit" and self.image_size % self.patch_size:
            raise RecipeArgumentError(f"--patch_size {self.patch_size} must divide --image_size {self.image_size}.")
        if self.model_type == "vit" and self.hidden_size % self.num_attention_heads:
            raise RecipeArgumentError(
                f"--num_attention_heads {self.num_attention_heads} must divide --hidden_size {self.hidden_size}."
            )
        if self.model_type == "resnet" and len(self.hidden_sizes) != len(self.depths):
            raise RecipeArgumentError(
                f"--hidden_sizes {self.hidden_sizes} and --depths {self.depths} need one entry per stage each."
            )


@dataclass
class DataTrainingArguments:
    """Fashion-MNIST from disk (default) or a Hub image dataset."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub image dataset. Default: Fashion-MNIST (offline)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with the Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist)."},
    )
    image_column_name: str = field(default="image", metadata={"help": "Image column of a Hub dataset."})
    label_column_name: str = field(default="label", metadata={"help": "Label column of a Hub dataset."})
    image_mean: list[float] = field(
        default_factory=list, metadata={"help": "Per-channel mean (default: Fashion-MNIST's, or 0.5)."}
    )
    image_std: list[float] = field(
        default_factory=list, metadata={"help": "Per-channel std (default: Fashion-MNIST's, or 0.5)."}
    )
    augment: bool = field(default=True, metadata={"help": "Random crop (padding 2) and horizontal flip in training."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on this many images (a seeded random subset); default / 0: all."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on this many images; 0: all."})
    metric_names: list[str] = field(default_factory=lambda: ["accuracy"], metadata={"help": "Metrics to report."})

    def __post_init__(self) -> None:
        all_if_zero(self, "max_train_samples", "max_eval_samples")


def build_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    """(train dataset, eval dataset, label names)."""
    offline = data_args.dataset_name is None
    mean = data_args.image_mean or (FASHION_MNIST_MEAN if offline else (0.5,))
    std = data_args.image_std or (FASHION_MNIST_STD if offline else (0.5,))
    transforms = [
        ImageTransform(model_args.image_size, model_args.num_channels, mean, std, augment=a)
        for a in (data_args.augment, False)
    ]
    generator = torch.Generator().manual_seed(seed)
    if offline:
        data = load_fashion_mnist(fashion_mnist_dir(data_args.data_dir))
        (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
        if data_args.max_train_samples is not None:  # a seeded random subset, so every class is present
            keep = torch.randperm(len(train_y), generator=generator)[: data_args.max_train_samples]
            train_x, train_y = train_x[keep], train_y[keep]
        if data_args.max_eval_samples is not None:
            test_x, test_y = test_x[: data_args.max_eval_samples], test_y[: data_args.max_eval_samples]
        return (
            TensorImageDataset(train_x, train_y, transforms[0]),
            TensorImageDataset(test_x, test_y, transforms[1]),
            list(FASHION_MNIST_LABELS),
        )
    raw = load_hub_or_files(
        data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
    )
    train = raw["train"]
    split = next((s for s in ("validation", "test") if s in raw), None)
    if split is None:
        parts = train.train_test_split(test_size=0.1, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = raw[split]
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in train.column_names:
            raise RecipeArgumentError(
                f"no column '{column}' (columns: {', '.join(train.column_names)}); "
                "set --image_column_name / --label_column_name."
            )
    train, evaluation, labels = encode_class_labels(train, evaluation, data_args.label_column_name)
    train = take_dataset(train, data_args.max_train_samples, seed=seed)
    evaluation = take_dataset(evaluation, data_args.max_eval_samples)
    wrap = [
        HubImageDataset(d, data_args.image_column_name, data_args.label_column_name, t)
        for d, t in ((train, transforms[0]), (evaluation, transforms[1]))
    ]
    return wrap[0], wrap[1], labels


def build_model(model_args: ModelArguments, labels: list[str]):
    label_kwargs = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if model_args.model_name_or_path:
        return AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=True, **label_kwargs, **hub_kwargs(model_args)
        )
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **label_kwargs, **hub_kwargs(model_args))
        return AutoModelForImageClassification.from_config(config)
    if model_args.model_type == "vit":
        config = ViTConfig(
            image_size=model_args.image_size,
            patch_size=model_args.patch_size,
            num_channels=model_args.num_channels,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size,
            **label_kwargs,
        )
        return ViTForImageClassification(config)
    config = ResNetConfig(
        num_channels=model_args.num_channels,
        embedding_size=model_args.embedding_size,
        hidden_sizes=model_args.hidden_sizes,
        depths=model_args.depths,
        layer_type="basic",
        downsample_in_first_stage=False,
        **label_kwargs,
    )
    return ResNetForImageClassification(config)


def main(argv: Sequence[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_recipe_args(
        (ModelArguments, DataTrainingArguments, TrainingArguments), RECIPE_DEFAULTS, argv
    )
    apply_q4shampoo_defaults(training_args, DEFAULT_Q4_OPTIM_ARGS)
    apply_runtime_defaults(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading images"):
        train_dataset, eval_dataset, labels = build_datasets(data_args, model_args, training_args.seed)
    model = build_model(model_args, labels)
    logger.info(
        "%s: %.2fM parameters; %d training and %d evaluation images",
        type(model).__name__,
        model.num_parameters() / 1e6,
        len(train_dataset),
        len(eval_dataset),
    )

    compute_metrics = classification_metrics(data_args.metric_names, len(labels), model_args.cache_dir)

    trainer = Q4ShampooTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        data_collator=collate_images,
        compute_metrics=compute_metrics,
    )
    card = {"tasks": "image-classification", "dataset": data_args.dataset_name or "fashion_mnist"}
    return train_and_evaluate(trainer, training_args, len(train_dataset), len(eval_dataset), model_card_kwargs=card)


if __name__ == "__main__":
    run_main(main)
