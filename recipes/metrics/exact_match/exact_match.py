"""Exact match as an offline ``evaluate`` module (load it by path; see recipes/recipes_support/metrics.py)."""

import datasets
import evaluate

from recipes_support.metric_functions import exact_match

_DESCRIPTION = "Exact match: the fraction of predicted strings identical to their reference."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): expected answers.
    regexes_to_ignore (list of str): patterns removed from both before comparing.
    ignore_case, ignore_punctuation, ignore_numbers (bool): normalisations, all False by default.
    strip (bool): drop surrounding whitespace first (default True, unlike the Hub metric).
Returns:
    exact_match (float in [0, 1])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
        strip=True,
    ):
        return exact_match(
            predictions,
            references,
            regexes_to_ignore=regexes_to_ignore,
            ignore_case=ignore_case,
            ignore_punctuation=ignore_punctuation,
            ignore_numbers=ignore_numbers,
            strip=strip,
        )
