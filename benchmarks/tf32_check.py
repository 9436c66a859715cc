"""Accuracy of the Newton inverse root with TF32 inputs, emulated on any device, against fp32 (moved here from
``hf_q4shampoo.bench --tf32_check``; docs/perf_notes.md v3; runs on a CPU in seconds).

    python benchmarks/tf32_check.py

The iteration below is the plain coupled Newton with every product's inputs rounded to TF32 (the library's own
``linalg`` cannot round inside its products); ``benchmarks/newton_precision_check.py`` asks the same of the
scheduled iteration the library runs today.
"""

from __future__ import annotations

import torch

from hf_q4shampoo import fidelity, linalg
from hf_q4shampoo.quant import dequantize_symmetric, quantize_symmetric


def tf32_check() -> str:
    """Accuracy of the Newton inverse root with TF32 inputs (emulated on any device) vs fp32.

    TF32 keeps 10 explicit mantissa bits; we round every matmul input to that (round to nearest) and
    accumulate in fp32, as the tensor cores do. Errors are NRE against the fp64 root, next to the error of
    storing the exact root in 4 bit (what the quantized forms keep anyway).
    """

    def to_tf32(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)

    def newton(a: torch.Tensor, eps: float, tf32: bool, iters: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
        mm = (lambda x, y: to_tf32(x) @ to_tf32(y)) if tf32 else (lambda x, y: x @ y)
        work = linalg.symmetrize(a.float())
        eye = linalg.eye_like(work)
        lam = linalg.power_iteration(work)
        work = work / lam + eps * eye
        z = 5.0 / (2.0 * torch.linalg.matrix_norm(work))
        x, m = z**0.25 * eye, z * work
        err = (m - eye).abs().max()
        for _ in range(iters):
            t = (5.0 * eye - m) / 4.0
            x_new, t2 = mm(x, t), mm(t, t)
            m_new = mm(mm(t2, t2), m)
            err_new = (m_new - eye).abs().max()
            if err_new > 1.2 * err or err < 1e-6:
                break
            x, m, err = x_new, m_new, err_new
        return x * lam**-0.25, lam

    gen = torch.Generator().manual_seed(0)
    draw = fidelity._gradient_factory(256, 32, gen)
    ema = 1e-6 * torch.eye(256, dtype=torch.float64)
    for _ in range(40):
        g = draw()
        ema = 0.95 * ema + 0.05 * g @ g.T
    cases = {
        "EMA of 40 low-rank gradients, n=256": ema,
        "log-uniform spectrum, n=512": fidelity.synthetic_spd(512, "log_uniform", torch.Generator().manual_seed(0)),
    }
    lines = ["Newton inverse 4th root, NRE vs fp64 (same ridge):"]
    for name, a in cases.items():
        for eps in (1e-6, 1e-4):
            x32, lam = newton(a, eps, False)
            xtf, _ = newton(a, eps, True)
            ref = linalg.inverse_root_eigh(a.double(), 4, eps * float(lam / torch.linalg.eigvalsh(a.double())[-1]))
            stored = dequantize_symmetric(quantize_symmetric(ref.float()))
            lines.append(
                f"  {name}, eps {eps:g}: fp32 {fidelity.nre(ref, x32):.2e}, tf32 {fidelity.nre(ref, xtf):.2e}, "
                f"exact root stored in 4 bit {fidelity.nre(ref, stored):.2e}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(tf32_check())
