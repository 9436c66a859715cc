"""Where a Q4Shampoo step's time goes on a GPU, and what candidate building blocks cost there.

    python benchmarks/perf_probe.py --out DIR [--skip_e2e] [--skip_micro]

Part 1 (micro): the refresh's pieces on the factor stacks of GPT-2 small (97 factors of order 1024, 134 of
order 768): float32 matrix products in IEEE fp32, TF32, split TF32 (3 TF32 products) and bf16; cuSOLVER's
batched Cholesky; the plain Newton root (25 iterations) against the
scheduled one (``linalg.inverse_root_scheduled``) in fp32 and in split TF32, each with its error against an
fp64 eigendecomposition; the 4-bit root decoder.
Part 2 (end to end): ``hf_q4shampoo.bench`` on GPT-2 small at update_freq 100 / 10 / 1 (root_freq 100) beside
fused AdamW, with stage times, the host time of ``optimizer.step()`` and a profile of steady steps.
Writes ``micro.txt``, ``bench_*.json`` and ``profile.txt`` under ``--out``; prints a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _time(fn, reps: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def split_tf32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_hi, b_hi = round_tf32(a), round_tf32(b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return torch.baddbmm(a_hi @ b_lo + a_lo @ b_hi, a_hi, b_hi)


def scheduled_root_split(a: torch.Tensor, eps: float) -> torch.Tensor:
    from hf_q4shampoo import linalg

    work = linalg.symmetrize(a.float())
    eye = linalg.eye_like(work)
    lam = linalg.power_iteration(work)
    start = 1.0 / (linalg.NEWTON_HEADROOM + eps)
    m = (work / lam[..., None, None] + eps * eye) * start
    x = None
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        for ca, cb in linalg.newton_schedule(4, eps):
            t = ca * eye - cb * m
            x = t if x is None else split_tf32_mm(x, t)
            t2 = split_tf32_mm(t, t)
            m = split_tf32_mm(split_tf32_mm(t2, t2), m)
    finally:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    return x * (start / lam).pow(0.25)[..., None, None]


def micro(lines: list[str]) -> None:
    from hf_q4shampoo import linalg, quant
    from hf_q4shampoo.preconditioners import FormSettings, make_form

    dev = torch.device("cuda")
    torch.manual_seed(0)
    stacks = {}
    for k, n in ((97, 1024), (134, 768)):
        g = torch.randn(k, n, n, device=dev) * torch.logspace(0, -3, n, device=dev)[:, None]
        stacks[(k, n)] = g @ g.mT / n + 1e-6 * torch.eye(n, device=dev)
    a = stacks[(97, 1024)]
    flop = 2 * 97 * 1024**3
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    t = _time(lambda: a @ a)
    lines.append(f"bmm 97x1024^3 fp32 IEEE: {t:.2f} ms = {flop / t / 1e9:.0f} TFLOP/s")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    t = _time(lambda: a @ a)
    lines.append(f"bmm 97x1024^3 TF32: {t:.2f} ms = {flop / t / 1e9:.0f} TFLOP/s")
    t = _time(lambda: split_tf32_mm(a, a))
    lines.append(f"bmm 97x1024^3 split TF32 (3 products + splits): {t:.2f} ms = {flop / t / 1e9:.0f} effective TFLOP/s")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    ab = a.bfloat16()
    t = _time(lambda: ab @ ab)
    lines.append(f"bmm 97x1024^3 bf16: {t:.2f} ms = {flop / t / 1e9:.0f} TFLOP/s")
    ref = a.double() @ a.double()
    for name, fn in (("fp32", lambda: a @ a), ("split", lambda: split_tf32_mm(a, a))):
        if name == "split":
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        out = fn()
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        lines.append(f"  product rel. error vs fp64, {name}: {float((out.double() - ref).norm() / ref.norm()):.2e}")

    for (k, n), s in stacks.items():
        t = _time(lambda s=s: torch.linalg.cholesky_ex(s), reps=3, warm=1)
        lines.append(f"cholesky_ex K={k} n={n}: {t:.2f} ms")
        t = _time(lambda s=s: linalg.power_iteration(s), reps=3, warm=1)
        lines.append(f"  power_iteration(32) K={k} n={n}: {t:.2f} ms")
        t = _time(lambda s=s: s @ s.mT, reps=3, warm=1)
        lines.append(f"  C C^T fp32 K={k} n={n}: {t:.2f} ms")

    sub = a[:4]
    lam, vec = torch.linalg.eigh(sub.double())
    for eps in (1e-6, 1e-4):
        ridge = eps * lam.amax(-1, keepdim=True)
        ref = (vec * (lam.clamp_min(0) + ridge).pow(-0.25).unsqueeze(-2)) @ vec.mT

        def err(x, ref=ref):
            return float((torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref)).max())

        t0 = _time(
            lambda eps=eps: linalg.inverse_root_newton(a, 4, eps, max_iters=25, host_checks=False), reps=3, warm=1
        )
        t1 = _time(lambda eps=eps: linalg.inverse_root_scheduled(a, 4, eps), reps=3, warm=1)
        t2 = _time(lambda eps=eps: scheduled_root_split(a, eps), reps=3, warm=1)
        e0 = err(linalg.inverse_root_newton(sub, 4, eps, max_iters=25, host_checks=False))
        e1 = err(linalg.inverse_root_scheduled(sub, 4, eps)[0])
        e2 = err(scheduled_root_split(sub, eps))
        lines.append(
            f"root K=97 n=1024 eps {eps:g} ({len(linalg.newton_schedule(4, eps))} scheduled steps): "
            f"newton25 {t0:.1f} ms (err {e0:.1e}); scheduled fp32 {t1:.1f} ms (err {e1:.1e}); "
            f"scheduled split-TF32 {t2:.1f} ms (err {e2:.1e})"
        )
    s = FormSettings.from_options(dev, root_method="newton")
    form = make_form("cholesky_ef", s)
    state = form.init_state(1024, 97, dev)
    form.refresh_root(state) if False else None
    q = quant.quantize_symmetric(a)
    state.update({f"root_{k}": v for k, v in q.items()})
    t = _time(lambda: form.root(state, torch.bfloat16))
    lines.append(f"decode 97 roots of order 1024 to bf16 (compiled): {t:.2f} ms")
    t = _time(
        lambda: quant.dequantize_lower_upper(quant.quantize_lower_upper(torch.tril(a, -1), torch.triu(a, 1)), 1024),
        reps=3,
        warm=1,
    )
    lines.append(f"quantize+dequantize_lower_upper K=97 n=1024 (eager): {t:.2f} ms")
    t = _time(lambda: form.update_statistics(dict(state), a), reps=3, warm=1)
    lines.append(f"cholesky_ef update_statistics K=97 n=1024 (today): {t:.1f} ms")


def e2e(out: Path, lines: list[str]) -> None:
    from hf_q4shampoo import bench

    configs = {
        "100": "update_freq=100,root_freq=100",
        "10": "update_freq=10,root_freq=100",
        "1": "update_freq=1,root_freq=100",
    }
    for i, (tag, optim_args) in enumerate(configs.items()):
        names = "adamw,q4shampoo" if i == 0 else "q4shampoo"
        argv = [
            "--optimizers",
            names,
            "--steps",
            "200",
            "--warmup",
            "20",
            "--phases",
            "--optim_args",
            optim_args,
            "--json",
            str(out / f"bench_{tag}.json"),
        ]
        if tag == "100":
            argv += ["--profile", "3"]
        args = bench.parse_args(argv)
        res = bench.run_benchmark(args)
        with open(out / f"bench_{tag}.json", "w") as fh:
            json.dump(res, fh, indent=1)
        if tag == "100":
            (out / "profile.txt").write_text(res["results"][-1].get("profile", ""))
            base = res["results"][0]
        for r in res["results"]:
            if r["optimizer"] == "adamw":
                continue
            stages = {k[6:-10]: round(v, 2) for k, v in r.items() if k.startswith("stage_") and k.endswith("_mean_ms")}
            lines.append(
                f"e2e {optim_args}: median {r['median_step_ms']:.1f} mean {r['mean_step_ms']:.1f} worst "
                f"{r['worst_step_ms']:.1f} (AdamW {base['median_step_ms']:.1f}/{base['mean_step_ms']:.1f}) -> mean x"
                f"{r['mean_step_ms'] / base['mean_step_ms']:.2f}; "
                f"host opt ms median {r.get('host_optimizer_median_ms', 0):.1f}; "
                f"first steps {[round(x) for x in r.get('warmup_step_ms', [])[:4]]}; stages mean {stages}"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="probe_out")
    p.add_argument("--skip_e2e", action="store_true")
    p.add_argument("--skip_micro", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d')}"]
    try:
        if not args.skip_micro:
            micro(lines)
    finally:
        (out / "micro.txt").write_text("\n".join(lines))
        print("\n".join(lines), flush=True)
    if not args.skip_e2e:
        e2e(out, lines)
        (out / "micro.txt").write_text("\n".join(lines))
        print("\n".join(lines[-3:]), flush=True)


if __name__ == "__main__":
    main()
