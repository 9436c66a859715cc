"""A one-minute, offline demo: AdamW vs Q4Shampoo on scikit-learn's handwritten digits (CPU).

    python benchmarks/demo.py [--epochs 8] [--optim_args "update_freq=5,root_freq=20"]    # needs scikit-learn

Trains the same small MLP with each optimizer (same seed, same batches) and prints the test
accuracy, final training loss, optimizer-state bytes per parameter and wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads collapse under load

import torch

from hf_q4shampoo import Q4Shampoo, parse_optim_args
from hf_q4shampoo.memory import optimizer_state_bytes


def digits_data(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's handwritten digits (ships with the package: no download), 80/20 split by a seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(y))
    return (x[:split], y[:split]), (x[split:], y[split:])


def digits_mlp(hidden: int = 256) -> torch.nn.Module:
    """MLP 64-hidden-hidden-10 with GELU."""
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, 10),
    )


def train_epochs(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    batch_size: int = 64,
) -> None:
    """Plain minibatch training with cross-entropy, batches drawn by a seeded permutation each epoch."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def train(name: str, make_opt, epochs: int, seed: int) -> dict:
    (xtr, ytr), (xte, yte) = digits_data(seed)
    torch.manual_seed(seed)
    model = digits_mlp()
    opt = make_opt(model.parameters())
    start = time.perf_counter()
    train_epochs(model, opt, xtr, ytr, epochs, seed + 1)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
        train_loss = torch.nn.functional.cross_entropy(model(xtr), ytr).item()
    mem = optimizer_state_bytes(opt)
    return {
        "optimizer": name,
        "test_acc": acc,
        "train_loss": train_loss,
        "bytes_per_param": mem.bytes_per_param,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--optim_args",
        type=str,
        default="update_freq=5,root_freq=20",
        help="Q4Shampoo options, as for --optim_args in a Transformers script",
    )
    args = parser.parse_args(argv)
    options = parse_optim_args(args.optim_args)
    rows = [
        train("adamw (torch)", lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0), args.epochs, args.seed),
        train(
            f"q4shampoo ({options.get('precond', 'cholesky_ef')})",
            lambda p: Q4Shampoo(p, lr=args.lr, **options),
            args.epochs,
            args.seed,
        ),
    ]
    print(f"\ndigits (sklearn), MLP 64-256-256-10, {args.epochs} epochs, lr {args.lr}, seed {args.seed}")
    print(f"{'optimizer':<28}{'test acc':>10}{'train loss':>12}{'state B/param':>15}{'seconds':>9}")
    for r in rows:
        print(
            f"{r['optimizer']:<28}{r['test_acc']:>10.4f}{r['train_loss']:>12.4f}{r['bytes_per_param']:>15.2f}{r['seconds']:>9.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
