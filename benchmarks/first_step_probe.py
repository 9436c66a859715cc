"""What Q4Shampoo's first ``optimizer.step()`` spends its seconds on (compilation, solver start-up, the step itself).

    python benchmarks/first_step_probe.py [--optim_args ...] [--top 45] [--serial]

GPT-2 small as ``hf_q4shampoo.bench`` (batch 4 x 512: only the optimizer matters). One forward/backward, then
the first ``optimizer.step()`` under cProfile (cumulative time per function, the ``--top`` largest), then the
second and third steps timed. Run it with empty Triton and Inductor caches (as a user's first run):
``TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.config import parse_optim_args


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--optim_args", default="update_freq=10,root_freq=100")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--serial", action="store_true", help="compile the warm-ups' kernels one by one (as before v16)")
    args = p.parse_args()
    if args.serial:
        from hf_q4shampoo import triton_precompile

        triton_precompile.ENABLED = False
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(loss_type="ForCausalLMLoss")).cuda().train()
    opt = Q4Shampoo(model.parameters(), lr=3e-4, weight_decay=0.1, **parse_optim_args(args.optim_args))
    x = torch.randint(0, 50257, (4, 512), generator=torch.Generator().manual_seed(1)).cuda()

    def backward() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, labels=x).loss.backward()
        torch.cuda.synchronize()

    backward()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    opt.step()
    torch.cuda.synchronize()
    profiler.disable()
    first = time.perf_counter() - start
    later = []
    for _ in range(2):
        backward()
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        later.append(time.perf_counter() - start)
    print(f"first optimizer.step(): {first:.2f} s; the next two: {', '.join(f'{t * 1e3:.1f} ms' for t in later)}")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
