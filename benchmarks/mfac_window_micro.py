"""Time the pieces of one SparseMFAC top-k step at the bench's size, and candidate replacements (issue 17).

    python benchmarks/mfac_window_micro.py [--d 22713986] [--m 1024] [--k_fraction 0.01] [--json OUT]

Synthetic window (the optimizer's own layout: m x k fp32 values, m x k int32 positions), two index
patterns: ``uniform`` (each row's positions drawn at random) and ``hot`` (70% of each row's positions
from a fixed 2% of the coordinates, as when a few coordinates stay large step after step, the worst case
for atomics). Each piece is timed with CUDA events, median of ``--repeat`` after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hf_q4shampoo.mfac_window import GATHER_CHUNK, TopKWindow, inverse_fisher_coefficients


def _time(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _indices(pattern: str, m: int, d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    hot = torch.randperm(d, generator=gen, device="cuda")[: max(k, d // 50)]
    for _ in range(m):
        if pattern == "uniform":
            rows.append(torch.randperm(d, generator=gen, device="cuda")[:k])
        else:
            n_hot = int(0.7 * k)
            picked = hot[torch.randperm(hot.numel(), generator=gen, device="cuda")[:n_hot]]
            rest = torch.randperm(d, generator=gen, device="cuda")[: 2 * k]
            rest = rest[~torch.isin(rest, picked)][: k - n_hot]
            rows.append(torch.cat([picked, rest]))
    return torch.stack(rows).to(torch.int32)


def combine_rowwise(state: dict, coef: torch.Tensor, d: int) -> torch.Tensor:
    """One index_add_ per row: positions within a row are distinct, so no two atomics of a launch collide."""
    out = torch.zeros(d, dtype=torch.float32, device=coef.device)
    values, indices = state["window_values"], state["window_indices"]
    for j in range(values.shape[0]):
        out.index_add_(0, indices[j], values[j] * coef[j])
    return out


def combine_index_put(state: dict, coef: torch.Tensor, d: int) -> torch.Tensor:
    """index_put_ with accumulate=True (sort-based on CUDA: deterministic)."""
    out = torch.zeros(d, dtype=torch.float32, device=coef.device)
    values, indices = state["window_values"], state["window_indices"]
    rows = max(1, GATHER_CHUNK // values.shape[1])
    for s in range(0, values.shape[0], rows):
        w = (values[s : s + rows] * coef[s : s + rows, None]).reshape(-1)
        out.index_put_((indices[s : s + rows].reshape(-1).long(),), w, accumulate=True)
    return out


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
    results["topk_ms"] = _time(lambda: torch.topk(acc.abs(), k, sorted=False), a.repeat)
    dots = torch.randn(m, m, device="cuda", dtype=torch.float64, generator=gen)
    dots = dots @ dots.T
    unit = torch.zeros(m, dtype=torch.float64, device="cuda")
    unit[0] = m
    results["solve_ms"] = _time(lambda: inverse_fisher_coefficients(dots, 5e-5, unit), a.repeat)
    for pattern in ("uniform", "hot"):
        state = {
            "window_values": torch.randn(m, k, device="cuda", generator=gen),
            "window_indices": _indices(pattern, m, d, k, gen),
        }
        x = torch.randn(d, device="cuda", generator=gen)
        coef = torch.randn(m, device="cuda", generator=gen)
        res = {
            "dots_ms": _time(lambda: window.dots(state, x), a.repeat),
            "combine_index_add_ms": _time(lambda: window.combine(state, coef), a.repeat),
            "combine_rowwise_ms": _time(lambda: combine_rowwise(state, coef, d), a.repeat),
            "combine_index_put_ms": _time(lambda: combine_index_put(state, coef, d), a.repeat),
        }
        ref = window.combine(state, coef)
        res["rowwise_max_rel_diff"] = float((combine_rowwise(state, coef, d) - ref).abs().max() / ref.abs().max())
        results[pattern] = res
        del state
        torch.cuda.empty_cache()
    print(json.dumps(results, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
