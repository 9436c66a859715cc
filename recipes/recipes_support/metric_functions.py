"""Plain-numpy implementations of the metrics the recipes report.

They are the single source of truth for the numbers: the ``evaluate`` modules in ``recipes/metrics/``
(``accuracy/accuracy.py``, ``f1/f1.py``, ``exact_match/exact_match.py``) wrap them, and
:func:`recipes_support.metrics.load_metric` calls them directly when ``evaluate`` (or
``datasets``, which it needs) is not installed — as on the GPU image. Results follow scikit-learn's
``accuracy_score`` / ``f1_score`` and the Hub ``exact_match`` metric (checked in the tests).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence, Sized

import numpy as np

__all__ = ["accuracy", "f1", "exact_match", "FUNCTIONS"]


def _as_1d(values: Sequence | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of labels, got shape {array.shape}.")
    return array


def _check_lengths(predictions: Sized, references: Sized) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
    if len(predictions) == 0:
        raise ValueError("no predictions to score.")


def accuracy(
    predictions: Sequence, references: Sequence, normalize: bool = True, sample_weight: Sequence | None = None
) -> dict[str, float]:
    """Fraction (or count, ``normalize=False``) of predictions equal to their reference."""
    pred, ref = _as_1d(predictions, "predictions"), _as_1d(references, "references")
    _check_lengths(pred, ref)
    weight = np.ones(len(pred)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    correct = float(np.sum(weight * (pred == ref)))
    return {"accuracy": correct / float(np.sum(weight)) if normalize else correct}


def _counts(pred: np.ndarray, ref: np.ndarray, label, weight: np.ndarray) -> tuple[float, float, float]:
    """Weighted true positives, false positives and false negatives of one class."""
    tp = float(np.sum(weight * ((pred == label) & (ref == label))))
    fp = float(np.sum(weight * ((pred == label) & (ref != label))))
    fn = float(np.sum(weight * ((pred != label) & (ref == label))))
    return tp, fp, fn


def _f1_from_counts(tp: float, fp: float, fn: float) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator > 0 else 0.0  # 0/0 -> 0, scikit-learn's default


def f1(
    predictions: Sequence,
    references: Sequence,
    labels: Sequence | None = None,
    pos_label=1,
    average: str | None = "binary",
    sample_weight: Sequence | None = None,
) -> dict[str, float | list[float]]:
    """F1 score, with scikit-learn's ``average`` choices: binary, micro, macro, weighted or None."""
    pred, ref = _as_1d(predictions, "predictions"), _as_1d(references, "references")
    _check_lengths(pred, ref)
    weight = np.ones(len(pred)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if average == "binary":
        present = set(np.unique(np.concatenate([pred, ref])).tolist())
        if len(present - {pos_label}) > 1:
            raise ValueError(
                f"average='binary' needs two classes but the labels are {sorted(present)}; "
                "pass average='macro', 'micro' or 'weighted'."
            )
        return {"f1": _f1_from_counts(*_counts(pred, ref, pos_label, weight))}
    if average not in ("micro", "macro", "weighted", None):
        raise ValueError(f"average={average!r} is not one of 'binary', 'micro', 'macro', 'weighted', None.")
    classes = np.unique(np.concatenate([pred, ref])) if labels is None else np.asarray(labels)
    counts = np.array([_counts(pred, ref, label, weight) for label in classes])  # (classes, 3)
    if average == "micro":
        return {"f1": _f1_from_counts(*counts.sum(axis=0))}
    scores = np.array([_f1_from_counts(*row) for row in counts])
    if average is None:
        return {"f1": scores.tolist()}
    if average == "macro":
        return {"f1": float(scores.mean())}
    support = counts[:, 0] + counts[:, 2]  # tp + fn = number of references of the class
    return {"f1": float(np.sum(scores * support) / support.sum()) if support.sum() > 0 else 0.0}


def _normalise(text: str, regexes_to_ignore, ignore_case: bool, ignore_punctuation: bool, ignore_numbers: bool) -> str:
    for pattern in regexes_to_ignore or ():
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str],
    regexes_to_ignore: Sequence[str] | None = None,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    strip: bool = True,
) -> dict[str, float]:
    """Fraction of predicted strings equal to their reference after the optional normalisations.

    ``strip`` (on by default, unlike the Hub metric) drops surrounding whitespace, which generation
    leaves around an answer.
    """
    _check_lengths(predictions, references)
    hits = 0
    for pred, ref in zip(predictions, references):
        pred = _normalise(str(pred), regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers)
        ref = _normalise(str(ref), regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers)
        if strip:
            pred, ref = pred.strip(), ref.strip()
        hits += pred == ref
    return {"exact_match": hits / len(predictions)}


#: metric name -> function; the names of the evaluate modules shipped in this folder.
FUNCTIONS = {"accuracy": accuracy, "f1": f1, "exact_match": exact_match}
