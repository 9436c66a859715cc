"""Time the pieces of one SparseMFAC top-k step at the bench's size, and candidate replacements (issue 17).

    python benchmarks/mfac_window_micro.py [--d 22713986] [--m 1024] [--k_fraction 0.01] [--json OUT]

Synthetic window (the optimizer's own layout: m x k fp32 values, m x k int32 positions), index patterns of a full
ring: ``uniform`` (each row's positions drawn at random), ``same`` / ``same_order`` (every row the same positions,
in its own or one order, as a fixed batch gives) and ``hot`` (70% of each row's positions from a fixed 2% of the
coordinates); and ``filling_25``, the ring after 25 steps (the rest unwritten: zeros at position 0). Each piece
is timed with CUDA events, median of ``--repeat`` after two warm-ups. ``combine_all_rows`` is the earlier
``combine`` (every ring row), ``combine_rowwise`` one scatter-add per row, ``combine_index_put`` torch's sort-based
accumulate.
"""

from __future__ import annotations

import argparse
import json

import torch
from perf_probe import _time as _cuda_median_ms  # CUDA-event median (this folder is on sys.path)

from hf_q4shampoo.mfac_window import GATHER_CHUNK, TopKWindow, inverse_fisher_coefficients


def _indices(pattern: str, m: int, d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    hot = torch.randperm(d, generator=gen, device="cuda")[: max(k, d // 50)].clone()
    same = torch.randperm(d, generator=gen, device="cuda")[:k].clone()
    for _ in range(m):
        if pattern == "same_order":  # and in the same order
            rows.append(same)
        elif pattern == "same":  # every row the same positions (a fixed batch: the bench's case)
            rows.append(same[torch.randperm(k, generator=gen, device="cuda")])
        elif pattern == "uniform":
            rows.append(torch.randperm(d, generator=gen, device="cuda")[:k].clone())
        else:
            n_hot = int(0.7 * k)
            picked = hot[torch.randperm(hot.numel(), generator=gen, device="cuda")[:n_hot]]
            rest = torch.randperm(d, generator=gen, device="cuda")[: 2 * k].clone()
            rest = rest[~torch.isin(rest, picked)][: k - n_hot]
            rows.append(torch.cat([picked, rest]))
    return torch.stack(rows).to(torch.int32)


def _weighted_chunks(state: dict, coef: torch.Tensor):
    """Every ring row (written or not) in chunks of ``GATHER_CHUNK`` entries: (first row, rows x coefs, positions)."""
    values, indices = state["window_values"], state["window_indices"]
    rows = max(1, GATHER_CHUNK // values.shape[1])
    for s in range(0, values.shape[0], rows):
        yield s, values[s : s + rows] * coef[s : s + rows, None], indices[s : s + rows]


def combine_rowwise(state: dict, coef: torch.Tensor, d: int) -> torch.Tensor:
    """One index_add_ per row (a row's positions are distinct: no two atomic adds of a launch collide)."""
    out = torch.zeros(d, dtype=torch.float32, device=coef.device)
    for _, weighted, indices in _weighted_chunks(state, coef):
        for j in range(weighted.shape[0]):
            out.index_add_(0, indices[j], weighted[j])
    return out


def combine_all_rows(state: dict, coef: torch.Tensor, d: int) -> torch.Tensor:
    """The earlier ``TopKWindow.combine``: every ring row, written or not, one index_add_ per chunk."""
    out = torch.zeros(d, dtype=torch.float32, device=coef.device)
    for _, weighted, indices in _weighted_chunks(state, coef):
        out.index_add_(0, indices.reshape(-1), weighted.reshape(-1))
    return out


def combine_index_put(state: dict, coef: torch.Tensor, d: int) -> torch.Tensor:
    """index_put_ with accumulate=True (sort-based on CUDA: deterministic)."""
    out = torch.zeros(d, dtype=torch.float32, device=coef.device)
    for _, weighted, indices in _weighted_chunks(state, coef):
        out.index_put_((indices.reshape(-1).long(),), weighted.reshape(-1), accumulate=True)
    return out


def _pattern_times(window: TopKWindow, indices: torch.Tensor, written: int, gen: torch.Generator, repeat: int) -> dict:
    m, d, k = window.m, window.d, window.k
    state = {
        "window_values": torch.randn(m, k, device="cuda", generator=gen),
        "window_indices": indices,
        "step": torch.tensor(float(written)),
    }
    state["window_values"][written:] = 0.0  # rows not written yet: zeros at position 0, as the optimizer keeps them
    state["window_indices"][written:] = 0
    x = torch.randn(d, device="cuda", generator=gen)
    coef = torch.randn(m, device="cuda", generator=gen)
    res = {
        "dots_ms": _cuda_median_ms(lambda: window.dots(state, x), repeat),
        "combine_ms": _cuda_median_ms(lambda: window.combine(state, coef), repeat),
        "combine_all_rows_ms": _cuda_median_ms(lambda: combine_all_rows(state, coef, d), repeat),
        "combine_rowwise_ms": _cuda_median_ms(lambda: combine_rowwise(state, coef, d), repeat),
        "combine_index_put_ms": _cuda_median_ms(lambda: combine_index_put(state, coef, d), repeat),
    }
    ref = window.combine(state, coef)
    res["rowwise_max_rel_diff"] = float((combine_rowwise(state, coef, d) - ref).abs().max() / ref.abs().max())
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=22713986)
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--k_fraction", type=float, default=0.01)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    d, m = a.d, a.m
    k = max(1, int(a.k_fraction * d))
    gen = torch.Generator(device="cuda").manual_seed(0)
    window = TopKWindow(m, d, k)
    results: dict = {"d": d, "m": m, "k": k, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    acc = torch.randn(d, device="cuda", generator=gen)
    results["topk_ms"] = _cuda_median_ms(lambda: torch.topk(acc.abs(), k, sorted=False), a.repeat)
    dots = torch.randn(m, m, device="cuda", dtype=torch.float64, generator=gen)
    dots = dots @ dots.T
    unit = torch.zeros(m, dtype=torch.float64, device="cuda")
    unit[0] = m
    results["solve_ms"] = _cuda_median_ms(lambda: inverse_fisher_coefficients(dots, 5e-5, unit), a.repeat)
    for pattern in ("same_order", "same", "uniform", "hot"):
        results[pattern] = _pattern_times(window, _indices(pattern, m, d, k, gen), m, gen, a.repeat)
        torch.cuda.empty_cache()
    # the ring after 25 steps (the bench's window): the other rows not written yet
    results["filling_25"] = _pattern_times(window, _indices("uniform", m, d, k, gen), min(m, 25), gen, a.repeat)
    print(json.dumps(results, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
