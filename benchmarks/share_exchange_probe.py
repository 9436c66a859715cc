"""How fast can ``shard_parameters`` send the updated parameters to every rank? (issue 16; docs/perf_notes.md v20)

    torchrun --standalone --nproc_per_node 2 benchmarks/share_exchange_probe.py --out OUT_DIR

GPT-2 small's parameters on each GPU, owned as ``shard_parameters`` owns them (``Q4Shampoo._owners``); each
variant sends every owner's parameters to the other ranks, timed with CUDA events after a barrier (median of
``--reps``). Variants:

- ``shipped_inplace_allgather``: ``DdpSplit.share_parameters`` as shipped (the parameters live in one flat
  buffer by owner; one in-place all-gather), with its host time per call;
- ``allgather_only``: one ``all_gather_into_tensor`` of the longest owner's bytes into a fresh buffer (the
  communication floor).

The round-packed exchange it replaced (pack into rounds, all-gather, unpack), a per-owner broadcast and P2P sends
per parameter were measured by this script at commits 9ec9d2c and f20b0a3 (docs/bench/multi_gpu_h200x2_v20/c3_*, c4_*).

Rank 0 writes ``OUT_DIR/share_exchange_probe_ws<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_q4shampoo import Q4Shampoo, distributed  # noqa: E402


def _timed(fn, reps: int, device: torch.device) -> dict[str, float]:
    times = []
    for i in range(reps + 3):
        dist.barrier()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        if i >= 3:
            times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = Q4Shampoo(params, lr=1e-3, update_freq=10, root_freq=100, shard_parameters=True)
    opt._owners()
    by_owner = opt._params_by_owner
    split = opt._ddp_split()
    stream = [sum(distributed._aligned(p.nbytes) for p in ps) for ps in by_owner]
    results: dict[str, dict[str, float]] = {}

    results["shipped_inplace_allgather"] = _timed(lambda: split.share_parameters(by_owner), args.reps, device)
    longest = max(stream)
    gathered = torch.empty(longest * world, dtype=torch.uint8, device=device)
    results["allgather_only"] = _timed(
        lambda: dist.all_gather_into_tensor(gathered, gathered[rank * longest : (rank + 1) * longest]),
        args.reps,
        device,
    )
    host = time.perf_counter()
    for _ in range(10):
        split.share_parameters(by_owner)
    results["shipped_inplace_allgather"]["host_ms_per_call"] = (time.perf_counter() - host) * 1e2

    report = {
        "world_size": world,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "owner_stream_bytes": stream,
        "owned_per_rank": [len(ps) for ps in by_owner],
        "results": results,
    }
    every = [None] * world
    dist.all_gather_object(every, report["results"])
    if rank == 0:
        report["results_per_rank"] = every
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"share_exchange_probe_ws{world}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report["results"], indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
