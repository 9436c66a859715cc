"""Can a statistics update be captured as a CUDA graph? (the next host-time lever: a statistics step's ~10 ms of
host time on the time-to-target shape, docs/perf_notes.md v26)

    python benchmarks/graph_capture_probe.py

Captures, on one GPU: (1) a batched ``torch.linalg.cholesky_ex`` (cuSOLVER / MAGMA inside a capture), (2) the
default form's ``update_statistics`` on a real statistics bucket of a small model, and replays each against an
eager run of the same inputs; prints whether the results are bitwise equal and the host time of a replay
against the eager call.
"""

from __future__ import annotations

import time

import torch

from hf_q4shampoo import Q4Shampoo


def capture(fn):
    """Warm ``fn`` on a side stream, capture it, return (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def host_ms(fn, reps=20):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - t) / reps * 1e3
    torch.cuda.synchronize()
    return host


def main() -> None:
    torch.manual_seed(0)
    for batch, n in ((12, 768), (8, 1024)):
        x = torch.randn(batch, n, n, device="cuda")
        a = x @ x.mT + n * torch.eye(n, device="cuda")
        eager = torch.linalg.cholesky_ex(a)[0]
        try:
            graph, out = capture(lambda a=a: torch.linalg.cholesky_ex(a)[0])
            graph.replay()
            torch.cuda.synchronize()
            same = torch.equal(out, eager)
            print(
                f"cholesky_ex {batch}x{n}: captured, bitwise equal {same}; host ms eager "
                f"{host_ms(lambda a=a: torch.linalg.cholesky_ex(a)):.3f} replay {host_ms(graph.replay):.3f}"
            )
        except Exception as error:  # noqa: BLE001 - the probe reports any failure
            print(f"cholesky_ex {batch}x{n}: capture failed: {type(error).__name__}: {error}")

    model = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Linear(1024, 768)).cuda()
    opt = Q4Shampoo(model.parameters(), lr=1e-3, update_freq=1, root_freq=4)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(64, 768, device="cuda")).square().mean().backward()
        opt.step()
    for bucket in [b for b in opt._layout.buckets if b.kind == "statistics"]:
        form = opt._form(bucket.device)
        src = torch.randn(bucket.rows, bucket.order, 64, device="cuda")
        gram = src @ src.mT
        start = {k: v.clone() for k, v in bucket.storage.items()}

        def run(start=start, gram=gram, form=form):
            sub = dict(start)
            form.update_statistics(sub, gram)
            return sub

        eager = run()
        try:
            graph, out = capture(run)
            graph.replay()
            torch.cuda.synchronize()
            same = all(torch.equal(out[k], eager[k]) for k in eager)
            print(
                f"update_statistics order {bucket.order} x {bucket.rows} rows: captured, bitwise equal {same}; "
                f"host ms eager {host_ms(run):.3f} replay {host_ms(graph.replay):.3f}"
            )
        except Exception as error:  # noqa: BLE001
            print(f"update_statistics order {bucket.order}: capture failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
