"""F1 score as an offline ``evaluate`` module (load it by path; see recipes/recipes_support/metrics.py)."""

import datasets
import evaluate

from recipes_support.metric_functions import f1

_DESCRIPTION = "F1: the harmonic mean of precision and recall, 2 * TP / (2 * TP + FP + FN)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int): classes to include when average is not 'binary'.
    pos_label (int): the positive class for average='binary' (default 1).
    average (str or None): 'binary' (default), 'micro', 'macro', 'weighted' or None (one score per class).
    sample_weight (list of float): optional weight of each example.
Returns:
    f1 (float, or list of float when average=None)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        return f1(
            predictions, references, labels=labels, pos_label=pos_label, average=average, sample_weight=sample_weight
        )
