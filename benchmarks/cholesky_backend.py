"""Host and GPU time of a batched Cholesky factorization, cuSOLVER against MAGMA (issue 11, next lever after v18).

    python benchmarks/cholesky_backend.py [--shapes 12x768,24x768,48x768,8x1024,96x64] [--repeats 50]
        [--queue_ms 20] [--json OUT]

v18's host profile of the time-to-target model found the statistics updates the largest host cost left in
``step()`` with the update graphed, and in them ``torch.linalg.cholesky_ex``: ~0.9 ms of host time per batched call
(under cProfile). For matrices this large torch's cuSOLVER path may factor a batch one matrix at a time, one set
of launches each, where MAGMA's batched routine is one call. This script measures, for each ``BATCHxN`` of SPD
fp32 matrices (the statistics' shapes), the host time per call without synchronising (what a host-bound loop
pays; with ``--queue_ms``, behind queued GPU work, which shows whether the call waits for the device), the GPU
time per call (CUDA events) and the largest difference between the two backends' factors. GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def spd_batch(batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, n, 2 * n, device="cuda", generator=g)
    return x @ x.mT / (2 * n) + 1e-3 * torch.eye(n, device="cuda")


def time_backend(a: torch.Tensor, backend: str, repeats: int, queue_ms: float = 0.0) -> dict[str, float]:
    """Median host time of one call (no synchronisation inside it) and its GPU time (CUDA events). ``queue_ms``:
    GPU work queued before each call (``torch.cuda._sleep``): a host time near it means the call waits for the
    device, as it would behind a training step's queued kernels."""
    torch.backends.cuda.preferred_linalg_library(backend)
    torch.linalg.cholesky_ex(a)  # load the library and its workspace
    host, gpu = [], []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        if queue_ms:
            torch.cuda._sleep(int(queue_ms * 1.5e6))  # ~1.5e6 cycles per ms on an H200
        begin.record()
        start = time.perf_counter()
        torch.linalg.cholesky_ex(a)
        host.append((time.perf_counter() - start) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(begin.elapsed_time(end))
    return {"host_ms": statistics.median(host), "gpu_ms": statistics.median(gpu)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="12x768,24x768,48x768,8x1024,96x64,4x3072")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--queue_ms", type=float, default=0.0, help="GPU work queued before each timed call")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        batch, n = (int(v) for v in shape.split("x"))
        a = spd_batch(batch, n, seed=batch * 7919 + n)
        row = {"batch": batch, "n": n}
        factors = {}
        for backend in ("cusolver", "magma"):
            try:
                row[backend] = time_backend(a, backend, args.repeats, args.queue_ms)
                factors[backend] = torch.linalg.cholesky_ex(a).L
            except RuntimeError as error:  # a build without MAGMA
                row[backend] = {"error": str(error)[:200]}
        if len(factors) == 2:
            row["max_abs_diff"] = float((factors["cusolver"] - factors["magma"]).abs().max())
        torch.backends.cuda.preferred_linalg_library("default")
        rows.append(row)
        print(json.dumps(row))
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
