"""Would a warm-started Newton iteration make inverse roots cheaper? (issue 11's untried lever; CPU, fp32)

    python benchmarks/warm_newton_check.py [--n 512] [--refreshes 6] [--json OUT]

Today's root (``linalg.inverse_root_scheduled``) starts cold from a scaled identity and runs a fixed schedule of
coupled steps (four fp32 products each), so it needs no host decision. A warm start from the previous root cannot
use the coupled form (its ``M = X^p A`` identity needs an ``X_0`` that commutes with the new ``A``), so the
candidate is the uncoupled Newton step ``X <- X ((p + 1) I - X^p A) / p`` (four products as well) started at the
previous refresh's root. This script builds a statistic the way Q4Shampoo does between two root refreshes
(``L <- beta L + (1 - beta) G G^T``, ten updates of gradients with a decaying spectrum, beta 0.95), then for each
refresh runs both and reports, against an fp64 eigendecomposition of ``(L + eps lambda_max I)^(-1/4)``:
products used, the residual ``max|X^4 A - I|`` and the relative error of the root; the warm iteration runs until
its residual is at most the cold one's or it diverges.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from hf_q4shampoo.linalg import inverse_root_scheduled, newton_schedule


def reference_root(a: torch.Tensor, eps: float, p: int) -> torch.Tensor:
    a = a.double()
    lam_max = torch.linalg.eigvalsh(a)[-1]
    w, v = torch.linalg.eigh(a + eps * lam_max * torch.eye(a.shape[0], dtype=a.dtype))
    return (v * w.clamp_min(1e-300).pow(-1.0 / p)) @ v.T


def residual(x: torch.Tensor, a_reg: torch.Tensor) -> float:
    x2 = x @ x
    return float((x2 @ x2 @ a_reg - torch.eye(x.shape[0], dtype=x.dtype)).abs().max())


def warm_newton(x0: torch.Tensor, a_reg: torch.Tensor, p: int, target: float, max_steps: int = 12):
    """Uncoupled Newton from ``x0``; returns (X, products, residuals per step)."""
    eye = torch.eye(x0.shape[0], dtype=x0.dtype)
    x, products, history = x0, 0, [residual(x0, a_reg)]
    products += 3  # the residual of the start: X^2, X^4, X^4 A
    for _ in range(max_steps):
        if history[-1] <= target or not math.isfinite(history[-1]) or history[-1] > 1e3:
            break
        x2 = x @ x
        m = x2 @ x2 @ a_reg
        x = x @ ((p + 1) * eye - m) / p
        x = (x + x.T) / 2
        products += 4
        history.append(residual(x, a_reg))  # 3 more products if a loop checks convergence on the device
        products += 3
    return x, products, history


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--refreshes", type=int, default=6)
    ap.add_argument("--updates", type=int, default=10, help="statistics updates between two root refreshes")
    ap.add_argument("--beta", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    p, n = 4, args.n
    g = torch.Generator().manual_seed(args.seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -4, n, dtype=torch.float64)  # gradients with a decaying spectrum
    stat = torch.zeros(n, n, dtype=torch.float64)
    cold_products = 3 + 4 * (len(newton_schedule(p, args.eps)) - 1)
    rows, previous = [], None
    for refresh in range(args.refreshes):
        for _ in range(args.updates):
            drift, _ = torch.linalg.qr(basis + 0.05 * torch.randn(n, n, generator=g, dtype=torch.float64))
            grad = drift @ torch.diag(spectrum) @ torch.randn(n, n // 2, generator=g, dtype=torch.float64)
            stat = args.beta * stat + (1 - args.beta) * grad @ grad.T
        a = stat.float()
        lam = float(torch.linalg.eigvalsh(stat)[-1])
        a_reg = (a + args.eps * lam * torch.eye(n)).float()
        ref = reference_root(stat, args.eps, p)
        cold, ok = inverse_root_scheduled(a, p, args.eps)
        cold_res = residual(cold, a_reg)
        row = {
            "refresh": refresh,
            "cold_products": cold_products,
            "cold_residual": cold_res,
            "cold_rel_error": float((cold.double() - ref).norm() / ref.norm()),
        }
        if previous is not None:
            warm, products, history = warm_newton(previous, a_reg, p, max(cold_res, 1e-6))
            row.update(
                warm_products=products,
                warm_start_residual=history[0],
                warm_residuals=history,
                warm_rel_error=float((warm.double() - ref).norm() / ref.norm()),
            )
        rows.append(row)
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}))
        previous = cold
    out = {
        "command": "python benchmarks/warm_newton_check.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "json"),
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
