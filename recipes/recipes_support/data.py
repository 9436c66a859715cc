"""Dataset plumbing that works without the ``datasets`` library.

The recipes' offline defaults are built as lists of dicts and wrapped in :class:`ListDataset`, which
``Trainer`` accepts like any ``torch.utils.data.Dataset``; only Hub datasets and local files go through
``datasets`` (imported lazily by :func:`load_hub_or_files`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .args import RecipeArgumentError

__all__ = [
    "ListDataset",
    "load_hub_or_files",
    "check_data_files",
    "take",
    "take_dataset",
    "encode_class_labels",
    "split_by_group",
    "pad_sequences",
]


class ListDataset(torch.utils.data.Dataset):
    """A list of example dicts, optionally transformed on access (e.g. tokenised or augmented)."""

    def __init__(self, rows: Sequence[dict[str, Any]], transform: Callable[[dict[str, Any]], Any] | None = None):
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        row = self.rows[index]
        return self.transform(row) if self.transform is not None else row


def take(rows: Sequence[Any], limit: int | None, seed: int | None = None) -> list[Any]:
    """The first ``limit`` rows (all when ``limit`` is None); shuffled first when ``seed`` is given."""
    rows = list(rows)
    if seed is not None:
        random.Random(seed).shuffle(rows)
    return rows if limit is None else rows[:limit]


def take_dataset(dataset, limit: int | None, seed: int | None = None):
    """:func:`take` for a ``datasets.Dataset``: the first ``limit`` rows, shuffled first when ``seed`` is given.

    Unlike :func:`take` it leaves the dataset as it is (no shuffle) when ``limit`` is None.
    """
    if limit is None:
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.select(range(min(limit, len(dataset))))


def encode_class_labels(train, evaluation, column: str):
    """(train, evaluation, label names) of two ``datasets`` splits whose ``column`` holds class ids.

    A ``ClassLabel`` column keeps its names. Plain values (local files, some Hub datasets) become a
    ``ClassLabel`` with ids in the sorted order of their strings, as ``run_glue.py`` does; the cast goes
    through strings so that integer labels work too (``map`` would keep the column's old type).
    """
    feature = train.features[column]
    if hasattr(feature, "names"):
        return train, evaluation, list(feature.names)
    from datasets import ClassLabel, Value

    names = sorted({str(v) for v in train.unique(column)})
    train, evaluation = (
        d.cast_column(column, Value("string")).cast_column(column, ClassLabel(names=names)) for d in (train, evaluation)
    )
    return train, evaluation, names


def split_by_group(
    rows: Sequence[dict[str, Any]], group_key: str, validation_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into train / validation so that no group (e.g. one movie) is on both sides.

    Groups are shuffled with ``seed`` and moved to validation until it holds ``validation_fraction`` of
    the rows; the order of rows inside each side follows the input.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise RecipeArgumentError(f"validation fraction must be in (0, 1), got {validation_fraction}.")
    groups = sorted({row[group_key] for row in rows})
    random.Random(seed).shuffle(groups)
    sizes: dict[Any, int] = {}
    for row in rows:
        sizes[row[group_key]] = sizes.get(row[group_key], 0) + 1
    target = validation_fraction * len(rows)
    held_out, count = set(), 0
    for group in groups:
        if count >= target:
            break
        held_out.add(group)
        count += sizes[group]
    train = [row for row in rows if row[group_key] not in held_out]
    validation = [row for row in rows if row[group_key] in held_out]
    return train, validation


def pad_sequences(sequences: Iterable[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Stack integer sequences into one tensor, padding to the longest with ``value``."""
    sequences = [list(s) for s in sequences]
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not seq:
            continue
        if side == "right":
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            out[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


_EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}


def check_data_files(files: dict[str, str | list[str] | None], allowed: Sequence[str]) -> dict[str, list[str]]:
    """Validate local data files: they exist and share one allowed extension. Returns split -> list of paths."""
    out: dict[str, list[str]] = {}
    for split, value in files.items():
        if not value:
            continue
        paths = [value] if isinstance(value, str) else list(value)
        for path in paths:
            suffix = Path(path).suffix.lower()
            if suffix not in allowed:
                raise RecipeArgumentError(
                    f"--{split}_file {path}: extension {suffix or '(none)'} is not supported; use one of "
                    f"{', '.join(allowed)}."
                )
            if not Path(path).is_file():
                raise RecipeArgumentError(f"--{split}_file {path} does not exist.")
        out[split] = paths
    kinds = {_EXTENSIONS[Path(p).suffix.lower()] for paths in out.values() for p in paths}
    if len(kinds) > 1:
        raise RecipeArgumentError(f"all data files must have the same kind of extension, got {sorted(kinds)}.")
    return out


def load_hub_or_files(
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    data_files: dict[str, list[str]] | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
    **kwargs: Any,
):
    """``datasets.load_dataset`` for a Hub name or local files, with a clear error if ``datasets`` is absent."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Hub datasets and local data files are read with the `datasets` library: pip install datasets "
            "(the recipes' offline defaults do not need it)."
        ) from err
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token, **kwargs)
    if not data_files:
        raise RecipeArgumentError("no dataset given: pass --dataset_name or --train_file.")
    builder = _EXTENSIONS[Path(next(iter(data_files.values()))[0]).suffix.lower()]
    return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **kwargs)
