"""How well each stored form preserves the inverse 4th root, measured as the papers do.

Metrics (paper 2 §5.1 / Table 1, paper 1's NRE/AE): for the exact ``f(A) = (A + eps lmax I)^(-1/4)``
computed in fp64 and an approximation ``g``,

* normalised error  ``NRE = ||f - g||_F / ||f||_F``
* angle error (deg) ``AE  = arccos(<f, g>_F / (||f||_F ||g||_F))``

Two settings:

* :func:`static_errors` quantizes one given SPD matrix the way each scheme does (paper 2 Table 1
  and papers.md §2.5's static check) and compares the root of the reconstruction;
* :func:`dynamic_errors` runs the real preconditioner forms through many EMA updates of random
  gradients, re-quantizing at every update, and compares against the fp64 EMA (papers.md §2.5's
  toy dynamic check).

Used by the tests and by ``python benchmarks/fidelity_tables.py`` (writes the tables of docs/results.md,
adding factors captured from a real training run).
"""

from __future__ import annotations

import torch

from . import linalg
from .preconditioners import FormSettings, make_form
from .quant import dequantize_blockwise, dequantize_diagreal, quantize_blockwise, quantize_diagreal, roundtrip_blockwise

__all__ = [
    "nre",
    "angle_error_deg",
    "random_orthogonal",
    "synthetic_spd",
    "reference_root",
    "static_errors",
    "dynamic_errors",
]


def nre(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Normalised error; for stacks of matrices the largest one."""
    ref, approx = ref.double(), approx.double()
    return float((torch.linalg.matrix_norm(ref - approx) / torch.linalg.matrix_norm(ref)).max())


def angle_error_deg(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Angle between the matrices as vectors, in degrees; for stacks the largest one."""
    ref, approx = ref.double().flatten(-2), approx.double().flatten(-2)
    cos = (ref * approx).sum(-1) / (ref.norm(dim=-1) * approx.norm(dim=-1))
    return float(torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0))).max())


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def synthetic_spd(n: int, spectrum: str, generator: torch.Generator) -> torch.Tensor:
    """``U diag(lambda) U^T`` with a random orthogonal U (fp64).

    ``spectrum="two_values"``: 10% of eigenvalues 1, 90% 1e-3 (paper 2's A2 has two distinct values;
    papers.md §2.5). ``"log_uniform"``: eigenvalues log-uniform in [1e-6, 1].
    """
    u = random_orthogonal(n, generator)
    if spectrum == "two_values":
        k = max(1, n // 10)
        lam = torch.cat([torch.ones(k), torch.full((n - k,), 1e-3)]).double()
    elif spectrum == "log_uniform":
        lam = 10.0 ** (-6.0 * torch.rand(n, generator=generator, dtype=torch.float64))
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}; allowed: 'two_values', 'log_uniform'")
    return (u * lam) @ u.T


def reference_root(a: torch.Tensor, eps: float) -> torch.Tensor:
    """fp64 ``(A + eps lmax I)^(-1/4)``."""
    return linalg.inverse_root_eigh(a.double(), 4, eps)


def static_errors(
    a: torch.Tensor,
    eps: float = 1e-6,
    quant_map: str = "linear2",
    block_size: int = 64,
    bjorck_iters: int = 4,
) -> dict[str, tuple[float, float]]:
    """(NRE, AE) of the root of each scheme's one-shot reconstruction of ``a`` (fp64 input)."""
    a = a.double()
    ref = reference_root(a, eps)
    n = a.shape[-1]
    out: dict[str, tuple[float, float]] = {}

    def record(name: str, approx: torch.Tensor) -> None:
        out[name] = (nre(ref, approx), angle_error_deg(ref, approx))

    def root_of(x: torch.Tensor) -> torch.Tensor:
        return linalg.inverse_root_eigh(x.double(), 4, eps)

    # naive / VQ: quantize A itself (off-diagonal 4-bit, fp32 diagonal)
    record(
        "naive",
        root_of(dequantize_diagreal(quantize_diagreal(a.float(), quant_map, block_size), quant_map, block_size)),
    )
    # cholesky: quantize the Cholesky factor of A + r I (fp32 diagonal)
    c, _ = linalg.robust_cholesky(a.float(), eps)
    c_off = roundtrip_blockwise(torch.tril(c, -1), quant_map, block_size)
    c_hat = c_off + torch.diag_embed(c.diagonal())
    record("cholesky", root_of(c_hat.double() @ c_hat.double().T))
    # eigen: quantize the exact eigenvectors (rows of V^T), eigenvalues fp32, with/without Björck
    evals, evecs = torch.linalg.eigh(a)
    vt = evecs.T.float()
    codes, scales = quantize_blockwise(vt, quant_map, block_size)
    vt_hat = dequantize_blockwise(codes, scales, n, quant_map, block_size).double()
    lam = evals.clamp_min(0)
    inv = (lam + eps * lam.max()).pow(-0.25)
    record("eigen_no_bjorck", (vt_hat.T * inv) @ vt_hat)
    vt_rect = linalg.bjorck_orthonormalize(vt_hat, bjorck_iters)
    record("eigen", (vt_rect.T * inv) @ vt_rect)
    return out


def _gradient_factory(n: int, rank: int, generator: torch.Generator):
    """Random gradients ``G = U diag(sigma) Z`` with log-spaced sigma in [1e-3, 1] (fixed U)."""
    u = random_orthogonal(n, generator)
    sigma = torch.logspace(0, -3, n, dtype=torch.float64)
    mix = u * sigma

    def draw() -> torch.Tensor:
        return mix @ torch.randn(n, rank, generator=generator, dtype=torch.float64)

    return draw


def dynamic_errors(
    forms: tuple[str, ...] = ("naive", "cholesky", "cholesky_ef", "eigen", "fp32"),
    n: int = 256,
    steps: int = 40,
    rank: int = 32,
    seed: int = 0,
    settings: FormSettings | None = None,
    stored_root: bool = False,
) -> dict[str, tuple[float, float]]:
    """(NRE, AE) of each form's inverse root after ``steps`` EMA updates with re-quantization.

    All forms see the same gradient sequence; the reference is the fp64 EMA starting at ``eps I``
    and its fp64 root. With ``stored_root=False`` the root is taken in fp32 from what the form
    stores (isolating the statistics' storage); with ``True`` it is the form's 4-bit stored root.
    """
    settings = settings or FormSettings.from_options()
    gen = torch.Generator().manual_seed(seed)
    draw = _gradient_factory(n, rank, gen)
    grads = [draw() for _ in range(steps)]
    beta, eps = settings.stat_decay, settings.matrix_eps
    ref_stats = eps * torch.eye(n, dtype=torch.float64)
    for g in grads:
        ref_stats = beta * ref_stats + (1 - beta) * (g @ g.T)
    ref = reference_root(ref_stats, eps)
    out = {}
    for name in forms:
        form = make_form(name, settings.replace(root_bits=4 if stored_root else 32))
        state = form.init_state(n, 1, torch.device("cpu"))
        for g in grads:
            gf = g.float().unsqueeze(0)
            form.update_statistics(state, gf @ gf.mT)
        form.refresh_root(state)
        approx = form.root(state)[0]
        out[name] = (nre(ref, approx), angle_error_deg(ref, approx))
    return out
