"""Where a rank's parameter exchange waits: read the traces of ``multi_gpu_bench.py --profile_steps``.

    python benchmarks/trace_comm_waits.py TRACE_DIR [--json OUT.json]

For each ``trace_<optimizer>_rank<r>.json`` in TRACE_DIR and each parameter exchange in it (NCCL all-gather or
broadcast kernels after the step's DDP all-reduce): the time from the end of the step's last all-reduce kernel
to the exchange kernel's start, the compute kernels' busy time in between (the optimizer's device work on that
rank), and the exchange kernel's duration. A kernel much longer on one rank than on the other is that rank
waiting for the other to arrive. The profiler slows the host, so absolute figures exceed unprofiled ones.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re


def exchanges(path: str) -> list[dict[str, float]]:
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    events.sort(key=lambda e: e["ts"])
    reduces = [e for e in events if "AllReduce" in e["name"]]
    out = []
    for comm in (e for e in events if "AllGather" in e["name"] or "Broadcast" in e["name"]):
        before = [r for r in reduces if r["ts"] < comm["ts"]]
        if not before:
            continue
        start = before[-1]["ts"] + before[-1]["dur"]
        busy = sum(k["dur"] for k in events if start <= k["ts"] < comm["ts"] and "nccl" not in k["name"].lower())
        out.append(
            {
                "kernel": comm["name"].split("(")[0],
                "after_allreduce_ms": (comm["ts"] - start) / 1e3,
                "compute_busy_ms": busy / 1e3,
                "exchange_kernel_ms": comm["dur"] / 1e3,
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_dir")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    report = {}
    for path in sorted(glob.glob(os.path.join(args.trace_dir, "trace_*_rank*.json"))):
        name = re.sub(r"^trace_|\.json$", "", os.path.basename(path))
        report[name] = exchanges(path)
        for row in report[name]:
            print(
                f"{name:36s} {row['kernel']:32s} after all-reduce {row['after_allreduce_ms']:6.2f} ms  "
                f"compute {row['compute_busy_ms']:6.2f} ms  exchange kernel {row['exchange_kernel_ms']:6.2f} ms"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
