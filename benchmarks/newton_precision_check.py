"""Can the scheduled Newton root run its products in TF32 or bf16? (CPU, emulated rounding; docs/perf_notes.md v6)

    python benchmarks/newton_precision_check.py

Rounds every product's inputs to 10 (TF32) or 7 (bf16) mantissa bits for the first LOW of the schedule's steps
(optionally recomputing M = X^4 A in fp32 before the fp32 steps, "R"), and prints the normalised error against the
fp64 root, beside the error of storing the exact root in 4 bit. Inputs: an EMA of 40 low-rank gradients (n=256)
and a log-uniform spectrum (n=512).
"""

import torch

from hf_q4shampoo import fidelity, linalg
from hf_q4shampoo.quant import dequantize_symmetric, quantize_symmetric


def rnd(x, bits):
    """Round fp32 to ``bits`` explicit mantissa bits (tf32: 10, bf16: 7)."""
    b = x.contiguous().view(torch.int32)
    drop = 23 - bits
    return ((b + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def mm_low(bits):
    return lambda a, b: rnd(a, bits) @ rnd(b, bits)


def sched_root(a, eps, low_steps, bits, restart=True):
    """The scheduled Newton root with the first ``low_steps`` steps' products in low precision."""
    work = linalg.symmetrize(a.float())
    eye = linalg.eye_like(work)
    lam = linalg.power_iteration(work)
    start = 1 / (linalg.NEWTON_HEADROOM + eps)
    big_a = work / lam[..., None, None] + eps * eye
    m = big_a * start
    x = None
    for s, (ca, cb) in enumerate(linalg.newton_schedule(4, eps)):
        mm = mm_low(bits) if s < low_steps else (lambda p, q: p @ q)
        if s == low_steps and restart and x is not None:
            x2 = x @ x
            m = (x2 @ x2) @ big_a  # X^4 A (x already includes start^(1/4))
        t = ca * eye - cb * m
        x = t if x is None else mm(x, t)
        t2 = mm(t, t)
        m = mm(mm(t2, t2), m)
    return x * (1 / lam).pow(0.25)[..., None, None] * start**0.25


def main():
    torch.manual_seed(0)
    # inputs: EMA of low-rank grads (n=256) and log-uniform spectrum n=512
    draw = fidelity._gradient_factory(256, 32, torch.Generator().manual_seed(0))
    ema = 1e-6 * torch.eye(256, dtype=torch.float64)
    for _ in range(40):
        g = draw()
        ema = 0.95 * ema + 0.05 * g @ g.T
    cases = {"ema256": ema, "logu512": fidelity.synthetic_spd(512, "log_uniform", torch.Generator().manual_seed(0))}
    for name, a64 in cases.items():
        a = a64.float()[None]
        for eps in (1e-6, 1e-4):
            lam = linalg.power_iteration(a)
            ridge = eps * float(lam[0] / torch.linalg.eigvalsh(a.double())[0, -1])
            ref = linalg.inverse_root_eigh(a.double(), 4, ridge)
            stored = dequantize_symmetric(quantize_symmetric(ref.float()))
            line = f"{name} eps {eps:g}: 4bit-store {fidelity.nre(ref[0], stored[0]):.1e}"
            full = linalg.inverse_root_scheduled(a, 4, eps)[0]
            line += f" fp32 {fidelity.nre(ref[0], full[0]):.1e}"
            n = len(linalg.newton_schedule(4, eps))
            for bits, bn in ((10, "tf32"), (7, "bf16")):
                for low in (n - 4, n - 3, n - 2, n):
                    for restart in (True, False):
                        x = sched_root(a, eps, low, bits, restart)
                        line += f" | {bn} {low}/{n}{'R' if restart else ''} {fidelity.nre(ref[0], x[0]):.1e}"
            print(line)


if __name__ == "__main__":
    main()
