"""Host time of one batched ``torch.linalg.cholesky_ex`` call on the GPU, by batch size and order (issue 16: the
statistics stage's host time, docs/perf_notes.md v22). Host time is measured without a sync inside the timed call;
the device time of the same calls with CUDA events.

    python benchmarks/cholesky_host_cost.py [--orders 256,768,1024] [--batches 1,2,4,8,16,32] [--repeats 20]
        [--queue_ms 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orders", default="256,768,1024")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--queue_ms",
        type=float,
        default=0.0,
        help="GPU work queued before each timed call (torch.cuda._sleep): a host time near it means the call waits "
        "for the device (a synchronisation), as it would behind a training step's queued kernels",
    )
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    for n in (int(v) for v in args.orders.split(",")):
        for b in (int(v) for v in args.batches.split(",")):
            g = torch.randn(b, n, 2 * n, device=dev)
            a = g @ g.transpose(1, 2) / (2 * n) + 1e-3 * torch.eye(n, device=dev)
            torch.linalg.cholesky_ex(a)  # warm-up (handles, workspaces)
            torch.cuda.synchronize()
            host, device = [], []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                if args.queue_ms:
                    torch.cuda._sleep(int(args.queue_ms * 1.5e6))  # ~1.5e6 cycles per ms (H200 ~1.5-2 GHz)
                start.record()
                t = time.perf_counter()
                torch.linalg.cholesky_ex(a)
                host.append((time.perf_counter() - t) * 1e3)
                end.record()
                torch.cuda.synchronize()
                device.append(start.elapsed_time(end))
            row = {"order": n, "batch": b, "host_ms": statistics.median(host), "device_ms": statistics.median(device)}
            rows.append(row)
            print(f"n {n:5d} batch {b:3d}  host {row['host_ms']:7.3f} ms  device {row['device_ms']:7.3f} ms")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
