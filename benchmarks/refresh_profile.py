"""Where the time of Q4Shampoo's refresh steps goes on a GPU: host launches or GPU work.

    python benchmarks/refresh_profile.py --out DIR [--optim_args update_freq=100,root_freq=100] [--first 100]
        [--window 12]

GPT-2 small (as ``hf_q4shampoo.bench``: batch 8 x 1024 random tokens, bf16 autocast) trained to step ``first - 1``,
then ``--window`` steps under ``torch.profiler`` (CPU and CUDA). For every step of the window it writes the host
time of forward/backward and of ``optimizer.step()``, the GPU time of the whole step (CUDA events), the number of
kernel launches the optimizer made and their summed GPU time; then the operators by self CPU time and by self
CUDA time (``profile.txt``, ``steps.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.config import parse_optim_args


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--optim_args", default="update_freq=100,root_freq=100")
    p.add_argument("--first", type=int, default=100)
    p.add_argument("--window", type=int, default=12)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(loss_type="ForCausalLMLoss")).cuda().train()
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = Q4Shampoo(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-4,
        **parse_optim_args(args.optim_args),
    )
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50257, (8, 1024), generator=gen).cuda() for _ in range(8)]
    rows = []

    def one_step(i: int, label: str | None) -> None:
        x = batches[i % len(batches)]
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        t1 = time.perf_counter()
        with record_function(label) if label else torch.autograd.profiler.record_function("opt"):
            opt.step()
        t2 = time.perf_counter()
        stop.record()
        rows.append(
            {"step": i + 1, "host_fwd_bwd_ms": (t1 - t0) * 1e3, "host_opt_ms": (t2 - t1) * 1e3, "ev": (start, stop)}
        )

    for i in range(args.first - 1):
        one_step(i, None)
    torch.cuda.synchronize()
    rows.clear()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.first - 1, args.first - 1 + args.window):
            one_step(i, f"optimizer_step_{i + 1}")
        torch.cuda.synchronize()
    for r in rows:
        start, stop = r.pop("ev")
        r["gpu_step_ms"] = start.elapsed_time(stop)
    events = prof.events()
    for r in rows:
        name = f"optimizer_step_{r['step']}"
        marks = [e for e in events if e.name == name and e.device_type.name == "CPU"]
        if not marks:
            continue
        mark = marks[0]
        lo, hi = mark.time_range.start, mark.time_range.end
        kernels = [
            e
            for e in events
            if e.device_type.name == "CPU" and lo <= e.time_range.start <= hi and "LaunchKernel" in e.name
        ]
        r["launches"] = len(kernels)
    (out / "steps.json").write_text(json.dumps({"optim_args": args.optim_args, "steps": rows}, indent=1))
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    table_cuda = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    (out / "profile.txt").write_text(
        f"{args.optim_args}\n\nby self CPU time\n{table_cpu}\n\nby self CUDA time\n{table_cuda}\n"
    )
    for r in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
