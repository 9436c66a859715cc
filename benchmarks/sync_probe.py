"""Where Q4Shampoo's ``optimizer.step()`` makes the host wait for the GPU (CUDA sync debug mode, with call sites).

    python benchmarks/sync_probe.py [--optim_args update_freq=100,root_freq=100] [--first 100] [--window 4]

GPT-2 small as ``hf_q4shampoo.bench`` (batch 4 x 512 here: only the optimizer's behaviour matters), trained to
step ``first - 1``; for each step of the window, every synchronising CUDA call inside ``optimizer.step()`` is
printed with the innermost frames of hf_q4shampoo that made it.
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.config import parse_optim_args


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--optim_args", default="update_freq=100,root_freq=100")
    p.add_argument("--first", type=int, default=100)
    p.add_argument("--window", type=int, default=4)
    args = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(loss_type="ForCausalLMLoss")).cuda().train()
    opt = Q4Shampoo(model.parameters(), lr=3e-4, weight_decay=0.1, **parse_optim_args(args.optim_args))
    x = torch.randint(0, 50257, (4, 512), generator=torch.Generator().manual_seed(1)).cuda()
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "hf_q4shampoo" in f.filename]
        sites[
            " <- ".join(f"{f.filename.split('hf_q4shampoo/')[-1]}:{f.lineno} {f.name}" for f in frames[-1:-5:-1])
        ] += 1

    for step in range(1, args.first + args.window):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        if step < args.first:
            opt.step()
            continue
        torch.cuda.synchronize()
        sites.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        print(f"step {step}: {sum(sites.values())} synchronising calls")
        for site, count in sites.most_common():
            print(f"  {count} x {site}")


if __name__ == "__main__":
    main()
