"""How many batched statistics updates a step makes (issue 11: each is ~40 launches and a factorization call).

    python benchmarks/statistics_calls.py [--n_embd 96] [--n_layer 12] [--optim_args update_freq=8,root_freq=80]

A GPT-2 of the given size on CPU, random tokens, ``--steps`` steps; counts the calls of the preconditioner form's
``update_statistics`` and prints them per step. Run it on two commits to compare (docs/perf_notes.md v18).
"""

from __future__ import annotations

import argparse

import torch

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.config import parse_optim_args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_embd", type=int, default=96)
    ap.add_argument("--n_layer", type=int, default=12)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--optim_args", default="update_freq=8,root_freq=80,max_precond_dim=96")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=args.n_embd, n_layer=args.n_layer, n_head=4)
    model = GPT2LMHeadModel(config)
    opt = Q4Shampoo(model.parameters(), lr=1e-3, **parse_optim_args(args.optim_args))
    form = type(opt._form(torch.device("cpu")))
    calls = [0]
    original = form.update_statistics

    def counted(self, state, gram):
        calls[0] += 1
        return original(self, state, gram)

    form.update_statistics = counted
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(args.steps):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    print(f"statistics update calls per step: {calls[0] / args.steps:.3f} ({calls[0]} in {args.steps} steps)")


if __name__ == "__main__":
    main()
