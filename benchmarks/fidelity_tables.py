"""The fidelity tables of docs/results.md: how well each stored form keeps the inverse 4th root.

    python benchmarks/fidelity_tables.py --json docs/results/fidelity.json     # needs scikit-learn

Static errors on synthetic matrices (paper 2 Table 1) and on Shampoo factors captured from a real training
run (an MLP on scikit-learn's digits, ``demo.py``), and dynamic errors after many re-quantized EMA updates,
for several error-feedback betas. The metrics and checks themselves are ``hf_q4shampoo.fidelity``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from demo import digits_data, digits_mlp, train_epochs  # benchmarks/demo.py, beside this script

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.fidelity import dynamic_errors, static_errors, synthetic_spd
from hf_q4shampoo.preconditioners import FormSettings


def captured_preconditioners(epochs: int = 6, hidden: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real Shampoo statistics: train an MLP on scikit-learn's digits with 32-bit Shampoo (statistics every
    step) and return the fp64 factors of its hidden-to-hidden layer (order ``hidden`` on both sides)."""
    (x, y), _ = digits_data(seed)
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    opt = Q4Shampoo(
        model.parameters(), lr=3e-3, precond="fp32", first_order_bits=32, update_freq=1, root_freq=10, refresh_spread=1
    )
    train_epochs(model, opt, x, y, epochs, seed)
    sides = opt.state[model[2].weight]["regions"][0]
    return {
        f"L (order {hidden})": sides["L"]["stats"][0].double(),
        f"R (order {hidden})": sides["R"]["stats"][0].double(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Inverse-4th-root fidelity of the preconditioner forms")
    parser.add_argument("--n", type=int, default=1200, help="order of the synthetic matrices (paper 2: 1200)")
    parser.add_argument("--dynamic-n", type=int, default=512)
    parser.add_argument("--dynamic-steps", type=int, default=60)
    parser.add_argument("--eps", type=float, default=1e-4, help="ridge (paper 2 uses 1e-4 for its error analysis)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ef-betas", type=str, default="0,0.5,0.9")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    result: dict = {"static": {}, "dynamic": {}, "args": vars(args)}
    torch.manual_seed(0)
    t0 = time.time()
    for spectrum in ("two_values", "log_uniform"):
        rows = [
            static_errors(synthetic_spd(args.n, spectrum, torch.Generator().manual_seed(s)), args.eps)
            for s in range(args.seeds)
        ]
        result["static"][spectrum] = {k: [sum(r[k][i] for r in rows) / len(rows) for i in range(2)] for k in rows[0]}
    for name, mat in captured_preconditioners().items():
        lam = torch.linalg.eigvalsh(mat)
        result.setdefault("real", {})[name] = {
            "condition_number": float(lam[-1] / lam[0].clamp_min(1e-300)),
            **{f"eps={eps:g}": static_errors(mat, eps) for eps in (args.eps, 1e-6)},
        }
    for beta_e in [float(b) for b in args.ef_betas.split(",")]:
        settings = FormSettings.from_options(matrix_eps=args.eps, ef_beta=beta_e)
        rows = [
            dynamic_errors(n=args.dynamic_n, steps=args.dynamic_steps, seed=s, settings=settings)
            for s in range(args.seeds)
        ]
        result["dynamic"][f"ef_beta={beta_e}"] = {
            k: [sum(r[k][i] for r in rows) / len(rows) for i in range(2)] for k in rows[0]
        }
    result["seconds"] = time.time() - t0
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
