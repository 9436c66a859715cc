"""Loading the metrics the recipes report, offline first.

``load_metric("accuracy")`` returns the evaluate module in ``recipes/metrics/accuracy`` (loaded by
path, so no Hub access; ``evaluate.load("accuracy")`` would need the Hub, since the evaluate wheel ships no
metric scripts), or — when ``evaluate`` or ``datasets`` is not installed — a
stand-in with the same ``compute(predictions=..., references=...)`` call backed by the same numpy code.
Any other name is passed to ``evaluate.load`` (a Hub metric such as ``"matthews_correlation"``, or a
local module path) when the Hub is reachable.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .metric_functions import FUNCTIONS

__all__ = [
    "MetricLike",
    "FunctionalMetric",
    "load_metric",
    "evaluate_available",
    "classification_metrics",
    "METRICS_DIR",
    "LOCAL_METRICS",
]

#: Folder holding one ``<name>/<name>.py`` evaluate module per offline metric (``recipes/metrics``). Each imports
#: ``recipes_support.metric_functions``, so ``recipes/`` must be on ``sys.path`` (it is for ``python recipes/X.py``).
METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"

#: Names of the metrics available offline.
LOCAL_METRICS = tuple(FUNCTIONS)


class MetricLike(Protocol):
    name: str

    def compute(self, *, predictions: Any, references: Any, **kwargs: Any) -> dict[str, Any]: ...


class FunctionalMetric:
    """The ``compute`` interface of an ``evaluate`` module over a plain function (used without evaluate)."""

    def __init__(self, name: str, function: Callable[..., dict[str, Any]]) -> None:
        self.name = name
        self._function = function

    def compute(self, *, predictions: Any, references: Any, **kwargs: Any) -> dict[str, Any]:
        return self._function(predictions, references, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionalMetric({self.name!r})"


def evaluate_available() -> bool:
    """``evaluate`` and the ``datasets`` it builds on are both importable."""
    return importlib.util.find_spec("evaluate") is not None and importlib.util.find_spec("datasets") is not None


def load_metric(name: str, cache_dir: str | None = None, use_evaluate: bool | None = None) -> MetricLike:
    """A metric by name: shipped offline modules first, then a local module path, then the Hub.

    Args:
        name: ``accuracy``, ``f1``, ``exact_match`` (shipped), a folder/file holding an evaluate module,
            or a Hub metric name.
        cache_dir: passed to ``evaluate.load``.
        use_evaluate: force (True) or avoid (False) the ``evaluate`` library for shipped metrics; by
            default it is used when installed.
    """
    if use_evaluate is None:
        use_evaluate = evaluate_available()
    if name in LOCAL_METRICS:
        if not use_evaluate:
            return FunctionalMetric(name, FUNCTIONS[name])
        import evaluate

        return evaluate.load(str(METRICS_DIR / name), cache_dir=cache_dir)
    if not evaluate_available():
        raise ImportError(
            f"metric {name!r} is not shipped with hf_q4shampoo (shipped: {', '.join(LOCAL_METRICS)}) and loading "
            "it needs the evaluate library: pip install evaluate datasets"
        )
    import evaluate

    try:
        return evaluate.load(name, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        where = "the local path" if Path(name).exists() else "the Hugging Face Hub (is it reachable?)"
        raise RuntimeError(
            f"could not load metric {name!r} from {where}: {err}\n"
            f"Metrics that work offline: {', '.join(LOCAL_METRICS)}."
        ) from err


def classification_metrics(
    names: Sequence[str], num_labels: int, cache_dir: str | None = None
) -> Callable[[Any], dict[str, Any]]:
    """A ``compute_metrics`` for ``Trainer``: argmax of the logits, then every metric in ``names``.

    ``f1`` is binary for two labels (the positive class is label 1) and macro-averaged otherwise.
    """
    metrics = [load_metric(name, cache_dir=cache_dir) for name in names]
    average = "binary" if num_labels == 2 else "macro"

    def compute_metrics(eval_pred: Any) -> dict[str, Any]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = np.argmax(logits, axis=-1)
        scores: dict[str, Any] = {}
        for metric in metrics:
            kwargs = {"average": average} if metric.name == "f1" else {}
            scores.update(metric.compute(predictions=predictions, references=eval_pred.label_ids, **kwargs))
        return scores

    return compute_metrics
