"""Where the host's time goes in a steady training step (issue 11: the time-to-target model is host-bound).

    python benchmarks/host_profile.py [--optimizer q4shampoo|q4adamw|adamw] [--optim_args update_freq=8,root_freq=80]
        [--steps 120] [--profile 80]

The time-to-target model's shape (GPT-2 12 x 768, vocabulary 8192, batch 16 x 512, bf16 autocast) with random
tokens. After ``--steps`` steps (past the first round of roots), ``--profile`` more steps run with the host time
of the forward, the backward and ``optimizer.step()`` measured apart (no synchronisation inside a step, as in
training) and ``optimizer.step()`` under cProfile; prints the three host times per step, the wall time per step
and the functions with the largest own and cumulative time inside ``step()``. ``--stages`` also times the host
time of each stage of ``step()`` (the gradients' bookkeeping, the layout, statistics, roots, the update) by
wrapping those functions with a clock, so the stages a graph could take over can be weighed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from hf_q4shampoo import Q4AdamW, Q4Shampoo
from hf_q4shampoo.config import parse_optim_args
from hf_q4shampoo.q4adamw_config import parse_q4adamw_optim_args


def build_optimizer(name: str, params, optim_args: str) -> torch.optim.Optimizer:
    """The optimizer under test with the time-to-target task's lr and weight decay (``--optim_args`` in the
    optimizer's own syntax; fused AdamW takes none)."""
    if name == "q4adamw":
        return Q4AdamW(params, lr=3e-4, weight_decay=0.1, **parse_q4adamw_optim_args(optim_args))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1, fused=True)
    return Q4Shampoo(params, lr=3e-4, weight_decay=0.1, **parse_optim_args(optim_args))


#: the functions ``--stages`` times: (module or optimizer attribute, stage name)
STAGES = {
    "q4shampoo": (
        ("optimizer", "step_gradients"),
        ("self", "_current_layout"),
        ("self", "_update_statistics"),
        ("self", "_refresh_roots"),
        ("self", "_run_update"),
    ),
    "q4adamw": (("q4adamw", "step_gradients"), ("self", "_current_layout"), ("self", "_run_update")),
}


def time_stages(opt: torch.optim.Optimizer, name: str) -> dict[str, list[float]]:
    """Wrap the stages of ``opt.step()`` with a host clock; returns ``{stage: [seconds, calls]}``, filled as
    they run (only while the ``measuring`` entry holds ``[1, 0]``)."""
    import importlib  # noqa: PLC0415

    totals: dict[str, list[float]] = {"measuring": [0, 0]}

    def timed(fn, stage):
        def wrapper(*a, **k):
            if not totals["measuring"][0]:
                return fn(*a, **k)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                entry = totals.setdefault(stage, [0.0, 0])
                entry[0] += time.perf_counter() - t
                entry[1] += 1

        return wrapper

    for owner, attr in STAGES.get(name, ()):
        if owner == "self":
            setattr(opt, attr, timed(getattr(opt, attr), attr))
        else:
            module = importlib.import_module(f"hf_q4shampoo.{owner}")
            setattr(module, attr, timed(getattr(module, attr), attr))
    return totals


def _torch_profile(one, args: argparse.Namespace) -> list[dict]:
    """Run ``args.torch_profile`` steps under torch.profiler; print and return the top ops by self host time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.torch_profile):
            one(i)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    by = "self_cpu_time_total" if args.profile_sort == "host" else "self_device_time_total"
    print(averages.table(sort_by=by, row_limit=args.top))
    rows = sorted(averages, key=lambda e: getattr(e, by), reverse=True)[: args.top]
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_host_ms_per_step": e.self_cpu_time_total / 1e3 / args.torch_profile,
            "self_device_ms_per_step": e.self_device_time_total / 1e3 / args.torch_profile,
        }
        for e in rows
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--optimizer", choices=("q4shampoo", "q4adamw", "adamw"), default="q4shampoo")
    p.add_argument("--optim_args", default=None, help="default: update_freq=8,root_freq=80 for q4shampoo, none else")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--profile", type=int, default=80)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--plain", action="store_true", help="no cProfile: the host times without its overhead")
    p.add_argument("--stages", action="store_true", help="also the host time of each stage of step() per step")
    p.add_argument(
        "--torch_profile",
        type=int,
        default=0,
        help="after the measured steps, this many more under torch.profiler: the ops and CUDA runtime calls with the "
        "most host time inside step() (waits for the GPU show as cudaStreamSynchronize / cudaMemcpy time)",
    )
    p.add_argument(
        "--profile_sort",
        choices=("host", "device"),
        default="host",
        help="--torch_profile's table: the ops with the most host time, or the kernels with the most GPU time (kernels "
        "replayed inside CUDA graphs included)",
    )
    args = p.parse_args()
    if args.optim_args is None:
        args.optim_args = "update_freq=8,root_freq=80" if args.optimizer == "q4shampoo" else ""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=512, loss_type="ForCausalLMLoss")
    model = GPT2LMHeadModel(config).cuda().train()
    opt = build_optimizer(args.optimizer, model.parameters(), args.optim_args)
    stages = time_stages(opt, args.optimizer) if args.stages else None
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 8192, (16, 512), generator=gen).cuda() for _ in range(8)]
    host = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    profiler = cProfile.Profile()

    def one(i: int, measure: bool) -> None:
        x = data[i % len(data)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if measure and not args.plain:
            profiler.enable()
        opt.step()
        if measure:
            if not args.plain:
                profiler.disable()
            t3 = time.perf_counter()
            host["forward"] += t1 - t0
            host["backward"] += t2 - t1
            host["step"] += t3 - t2

    for i in range(args.steps):
        one(i, False)
    torch.cuda.synchronize()
    if stages is not None:
        stages["measuring"][0] = 1
    start = time.perf_counter()
    for i in range(args.profile):
        one(args.steps + i, True)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.profile
    # cProfile's own overhead inflates the step's host time; the split is what matters
    result = {k + "_host_ms": 1e3 * v / args.profile for k, v in host.items()}
    result["wall_ms_per_step"] = 1e3 * wall
    if stages is not None:
        stages["measuring"][0] = 0
        result["stage_host_ms_per_step"] = {
            k: {"ms_per_step": 1e3 * t / args.profile, "calls": int(n)}
            for k, (t, n) in stages.items()
            if k != "measuring"
        }
    if args.torch_profile:
        result["torch_profile"] = _torch_profile(lambda i: one(args.steps + args.profile + i, False), args)
    result["optimizer"], result["optim_args"] = args.optimizer, args.optim_args
    result["step_graph"] = opt.graph_info() if hasattr(opt, "graph_info") else None
    print(json.dumps(result))
    for key in () if args.plain else ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
        print(text.getvalue())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
