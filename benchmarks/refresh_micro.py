"""Time the pieces of one refresh (Gram, Cholesky, roots, 4-bit codes, each form's two refresh calls) on a stack of
``--k`` factors of order ``--n`` (moved here from ``hf_q4shampoo.bench --micro``; docs/perf_notes.md v3).

    python benchmarks/refresh_micro.py [--k 6 --n 1024] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hf_q4shampoo import linalg, quant
from hf_q4shampoo.preconditioners import FormSettings, make_form


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def micro_refresh(k: int, n: int, device: torch.device) -> str:
    """Time the pieces of one refresh on a stack of ``k`` factors of order ``n``."""
    g = torch.randn(k, n, 4 * n, device=device) * torch.logspace(0, -3, n, device=device)[:, None]
    a = g @ g.mT / (4 * n)
    c, _ = linalg.robust_cholesky(a)
    q_lu = quant.quantize_lower_upper(torch.tril(c, -1), torch.zeros_like(c))
    q_sym = quant.quantize_symmetric(a)
    cases: dict[str, Callable[[], Any]] = {
        "gram G G^T (n x 4n)": lambda: g @ g.mT,
        "matmul n x n": lambda: a @ a,
        "cholesky_ex x1": lambda: torch.linalg.cholesky_ex(a),
        "robust_cholesky (3 attempts, no sync)": lambda: linalg.robust_cholesky(a, host_checks=False),
        "power_iteration (32)": lambda: linalg.power_iteration(a),
        "newton root (25 it, no sync)": lambda: linalg.inverse_root_newton(a, max_iters=25, host_checks=False),
        "eigh root": lambda: linalg.inverse_root_eigh(a),
        "quantize_lower_upper": lambda: quant.quantize_lower_upper(torch.tril(c, -1), torch.zeros_like(c)),
        "dequantize_lower_upper": lambda: quant.dequantize_lower_upper(q_lu, n),
        "quantize_symmetric": lambda: quant.quantize_symmetric(a),
        "dequantize_symmetric": lambda: quant.dequantize_symmetric(q_sym),
    }
    for form_name in ("cholesky_ef", "eigen", "fp32"):
        form = make_form(form_name, FormSettings.from_options(device, root_method="newton"))
        state = form.init_state(n, k, device)
        form.update_statistics(state, a)
        cases[f"{form_name}: update_statistics"] = lambda f=form, st=state: f.update_statistics(dict(st), a)
        cases[f"{form_name}: refresh_root"] = lambda f=form, st=state: f.refresh_root(dict(st))
    lines = [f"refresh pieces, K={k} factors of order n={n} on {device} (median of 5 after 2 warm-ups):"]
    for name, fn in cases.items():
        times = []
        for rep in range(7):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if rep >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        lines.append(f"  {name:<42}{statistics.median(times):>10.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=6, help="factors in the stack")
    p.add_argument("--n", type=int, default=1024, help="order of each factor")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(micro_refresh(args.k, args.n, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
