"""Command line of ``q4shampoo bench`` / ``python -m hf_q4shampoo.bench``: the arguments only.

Kept apart from ``bench.py`` so that ``q4shampoo bench --help`` answers without importing torch; the benchmark
itself (and what it measures) is described in ``bench.py``.
"""

from __future__ import annotations

import argparse

__all__ = ["parse_args", "DESCRIPTION"]

DESCRIPTION = """Speed and memory benchmark: the same model and batches under several optimizers, in one process.

    python -m hf_q4shampoo.bench [--optimizers adamw,adamw_8bit,adamw_4bit,q4shampoo,shampoo_fp32,q4adamw]
                                 [--n_layer 12 --n_embd 768 --batch 8 --seq 1024] [--steps 220 --warmup 10]
                                 [--optim_args "update_freq=100,root_freq=100"] [--json out.json]

Model: GPT-2 built from ``GPT2Config`` (default: GPT-2 small, 124M), random tokens, bf16 autocast with
fp32 weights on CUDA (fp32 on CPU). Each optimizer gets a fresh model with the same initial weights and
the same batches. Weight decay 0.1 on matrices, 0 on biases/norms, as the Trainer groups it.

Reported per optimizer: optimizer-state bytes/param (``memory.optimizer_state_bytes``), persistent
optimizer memory (allocated bytes added by creating the optimizer and its state), peak allocated memory
over the timed steps, median step, amortized mean step (over a window that includes Shampoo's
statistics/root refreshes: pick ``--steps`` >= ``root_freq``), worst step, and each as a ratio to the
first optimizer in the list (fused AdamW by default). A step = zero_grad + forward + backward +
optimizer step, timed with CUDA events (wall clock on CPU).

Peers that are not installed (bitsandbytes, torchao) are listed as skipped.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="q4shampoo bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--optimizers", default="adamw,adamw_8bit,adamw_4bit,shampoo_fp32,q4shampoo")
    p.add_argument("--optim_args", default="update_freq=100,root_freq=100", help="Q4Shampoo options")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=220)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the full results (incl. every step time) here")
    p.add_argument("--raise_errors", action="store_true", help="do not turn an optimizer's failure into 'skipped'")
    p.add_argument(
        "--keep_grads",
        action="store_true",
        help="zero the gradients in place (set_to_none=False): they keep their addresses from step to step",
    )
    p.add_argument(
        "--phases",
        action="store_true",
        help="also time the stages of Q4Shampoo's step (statistics, roots, apply, grafting, first_order)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, profile this many more steps of each Q4Shampoo optimizer and print the top ops",
    )
    return p.parse_args(argv)
