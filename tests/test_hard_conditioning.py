"""One hard case of the hard-conditioning family (``benchmarks/hard_conditioning.py``, issue 14).

Least squares with one 256 x 128 weight whose inputs have condition number 1e6 in a random basis; statistics
every step and roots every 10 (every update re-encodes the stored factors: the hardest case for 4-bit storage),
200 steps of 256, each optimizer at its best of two learning rates. docs/results.md §4 has the whole family.
"""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "hard_conditioning", Path(__file__).resolve().parents[1] / "benchmarks" / "hard_conditioning.py"
)
hc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hc)

SCHEDULE = dict(update_freq=1, root_freq=10)
LRS = (0.2, 0.4)  # the two best of the family's grid for every form on this problem


def _best(problem, **options):
    return min(hc.run(problem, {**SCHEDULE, **options}, lr) for lr in LRS)


@pytest.fixture(scope="module")
def problem():
    return hc.Problem("ls_k1e6_256x128")


def test_default_stays_close_to_the_fp32_form(problem):
    # same first-order states (the default 4-bit moments) for both: only the preconditioner's storage differs.
    # Measured (2-core CPU, 2026-11-30): default 1.46x the fp32 form; paper 1's layout (factor_upper="feedback",
    # factor_scaling="row", the default before issue 14) 2.73x, so this bound fails on it.
    fp32 = _best(problem, precond="fp32")
    default = _best(problem)
    print(f"fp32 form {fp32:.3g}, default {default:.3g} ({default / fp32:.2f}x)")
    assert default <= 1.6 * fp32


def test_two_code_roots_keep_the_early_roots_gain():
    # issue 14 (docs/results.md §4.7): with the "auto" schedule of a 200-step run (the early first root at step 4)
    # the 4-bit roots are what the default loses most by; root_bits=8 (a second code of their residual) brings it
    # back near the fp32 form. fp32 moments, so only the preconditioner's storage differs. Measured on this
    # problem (2-core CPU, 2026-12-01): fp32 form 0.000875, default 0.00111 (1.26x), root_bits=8 0.000928 (1.06x).
    problem = hc.Problem("ls_k1e6_256x128")
    auto = dict(total_steps=200, first_order_bits=32)
    fp32 = min(hc.run(problem, {**auto, "precond": "fp32"}, lr) for lr in (0.4, 0.8))
    four = min(hc.run(problem, auto, lr) for lr in (0.4, 0.8))
    eight = min(hc.run(problem, {**auto, "root_bits": 8}, lr) for lr in (0.4, 0.8))
    print(f"fp32 form {fp32:.3g}, 4-bit roots {four:.3g}, two-code roots {eight:.3g}")
    assert eight <= 1.12 * fp32 < four
