"""Metric modules shipped with hf_q4shampoo so that the recipes evaluate offline.

Each ``<name>/<name>.py`` is a small ``evaluate.Metric`` loadable by path
(``evaluate.load(str(METRICS_DIR / "accuracy"))``), because the ``evaluate`` wheel ships no metric
scripts and ``evaluate.load("accuracy")`` needs the Hub. The arithmetic lives in
:mod:`hf_q4shampoo.metrics.functional`, which the recipes also use directly when ``evaluate`` is
not installed. Use :func:`hf_q4shampoo.recipes_support.metrics.load_metric` rather than these paths.
"""

from pathlib import Path

from .functional import FUNCTIONS

#: Folder holding one sub-folder per shipped evaluate module.
METRICS_DIR = Path(__file__).resolve().parent

#: Names of the metrics available offline.
LOCAL_METRICS = tuple(FUNCTIONS)

__all__ = ["METRICS_DIR", "LOCAL_METRICS"]
