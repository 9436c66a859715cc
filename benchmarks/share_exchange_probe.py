"""How fast can ``shard_parameters`` send the updated parameters to every rank? (issue 16; docs/perf_notes.md v20)

    torchrun --standalone --nproc_per_node 2 benchmarks/share_exchange_probe.py --out OUT_DIR

GPT-2 small's parameters on each GPU, owned as ``shard_parameters`` owns them (``Q4Shampoo._owners``); each
variant sends every owner's parameters to the other ranks, timed with CUDA events after a barrier (median of
``--reps``). Variants:

- ``rounds_64mib``: ``DdpSplit.share_parameters`` as shipped (rounds of 64 MiB over all ranks: pack, all-gather,
  unpack);
- ``rounds_1gib``: the same in one round (how much the round count costs);
- ``allgather_only``: one ``all_gather_into_tensor`` of the longest owner stream, nothing packed (the
  communication floor of an all-gather);
- ``pack_unpack_only``: the copies of ``rounds_64mib`` without the all-gather;
- ``broadcast_per_owner``: each owner's stream packed and broadcast from it (no padding to the longest);
- ``p2p_per_parameter``: ``batch_isend_irecv``, each parameter sent by its owner straight into the others'
  parameters (no copies, one grouped launch).

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

    results["rounds_64mib"] = _timed(lambda: split.share_parameters(by_owner), args.reps, device)
    distributed._SHARE_ROUND_BYTES = 2**30 * world
    split.__dict__.pop("_share_plan", None)
    results["rounds_1gib"] = _timed(lambda: split.share_parameters(by_owner), args.reps, device)

    longest = max(stream)
    gathered = torch.empty(longest * world, dtype=torch.uint8, device=device)
    results["allgather_only"] = _timed(
        lambda: dist.all_gather_into_tensor(gathered, gathered[rank * longest : (rank + 1) * longest]),
        args.reps,
        device,
    )
    distributed._SHARE_ROUND_BYTES = 64 * 2**20
    plan = distributed._share_rounds(by_owner, world)

    def pack_unpack() -> None:
        for size, placed in plan:
            output = torch.empty(size * world, dtype=torch.uint8, device=device)
            mine = placed[rank]
            if mine:
                torch._foreach_copy_(
                    [output[rank * size + at : rank * size + at + n] for _, _, n, at in mine],
                    [distributed._memory_bytes(p)[s : s + n] for p, s, n, _ in mine],
                )
            theirs = [(p, s, n, o * size + at) for o, ps in enumerate(placed) if o != rank for p, s, n, at in ps]
            if theirs:
                torch._foreach_copy_(
                    [distributed._memory_bytes(p)[s : s + n] for p, s, n, _ in theirs],
                    [output[at : at + n] for _, _, n, at in theirs],
                )

    results["pack_unpack_only"] = _timed(pack_unpack, args.reps, device)

    buffers = [torch.empty(n, dtype=torch.uint8, device=device) for n in stream]

    def broadcast_per_owner() -> None:
        for owner, ps in enumerate(by_owner):
            views, at = [], 0
            for p in ps:
                views.append(buffers[owner][at : at + p.nbytes])
                at += distributed._aligned(p.nbytes)
            raw = [distributed._memory_bytes(p) for p in ps]
            if owner == rank:
                torch._foreach_copy_(views, raw)
            dist.broadcast(buffers[owner], src=owner)
            if owner != rank:
                torch._foreach_copy_(raw, views)

    results["broadcast_per_owner"] = _timed(broadcast_per_owner, args.reps, device)

    def p2p() -> None:
        ops = []
        for owner, ps in enumerate(by_owner):
            for p in ps:
                raw = distributed._memory_bytes(p)
                if owner == rank:
                    ops += [dist.P2POp(dist.isend, raw, r) for r in range(world) if r != rank]
                else:
                    ops.append(dist.P2POp(dist.irecv, raw, owner))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    results["p2p_per_parameter"] = _timed(p2p, args.reps, device)
    host = time.perf_counter()
    p2p()
    results["p2p_per_parameter"]["host_ms_one_call"] = (time.perf_counter() - host) * 1e3

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
