import math

import pytest
import torch

from hf_q4shampoo import linalg


def spd(n: int, cond: float, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64) * (
        10 ** (4 * torch.rand(batch, 1, generator=g, dtype=torch.float64) - 2)
    )
    return (q * lam.unsqueeze(-2)) @ q.mT


def fp64_root(a: torch.Tensor, eps: float, p: int = 4) -> torch.Tensor:
    lam, v = torch.linalg.eigh(a.double())
    lam = lam.clamp_min(0)
    return (v * (lam + eps * lam.amax(-1, keepdim=True)).pow(-1 / p).unsqueeze(-2)) @ v.mT


def rel_err(x, ref):
    return float((torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref)).max())


@pytest.mark.parametrize("cond", [1e1, 1e4, 1e8])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_root_against_fp64(cond, method):
    a = spd(96, cond, seed=int(math.log10(cond))).float()
    eps = 1e-6
    x = linalg.matrix_inverse_root(a, 4, eps, method=method)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    err = rel_err(x, fp64_root(a.double(), eps))  # reference: fp64 root of the same fp32 input
    # eigh retries in fp64 when fp32 cannot resolve the ridge; Newton stays in fp32, whose rounding
    # of A (~1e-7 lambda_max) is a 10% perturbation of the ridge at eps = 1e-6 for cond >= 1e6.
    tol = {"eigh": {1e1: 1e-5, 1e4: 1e-5, 1e8: 1e-5}, "newton": {1e1: 1e-4, 1e4: 1e-3, 1e8: 5e-2}}[method][cond]
    assert err < tol, err


def test_inverse_root_other_p_and_zero_matrix():
    a = spd(40, 1e3)
    x = linalg.inverse_root_eigh(a.float(), p=2, ridge_eps=1e-8)
    assert rel_err(x, fp64_root(a, 1e-8, p=2)) < 1e-3
    z = linalg.inverse_root_eigh(torch.zeros(2, 5, 5))
    assert torch.equal(z, torch.eye(5).expand(2, 5, 5))
    z = linalg.inverse_root_newton(torch.zeros(2, 5, 5))
    torch.testing.assert_close(z, torch.eye(5).expand(2, 5, 5))


def test_newton_matches_eigh_on_indefinite_rounding_noise():
    # (a clustered top of the spectrum slows power iteration, and the ridge eps * lambda_max moves
    # with its estimate: spd() spaces eigenvalues by 10^(6/63), which 32 iterations resolve)
    a = spd(64, 1e6).float()
    a = a + 1e-9 * torch.randn_like(a)  # not exactly symmetric
    x1 = linalg.inverse_root_newton(a, ridge_eps=1e-4)
    x2 = linalg.inverse_root_eigh(a, ridge_eps=1e-4)
    assert rel_err(x1, x2.double()) < 2e-3


def test_power_iteration():
    a = spd(80, 1e3)
    est = linalg.power_iteration(a, iters=50)
    true = torch.linalg.eigvalsh(a)[..., -1]
    torch.testing.assert_close(est, true, rtol=1e-3, atol=0)
    assert torch.all(linalg.power_iteration(a, iters=10) <= true * (1 + 1e-9))


def _plain_power_iteration(a: torch.Tensor, iters: int) -> torch.Tensor:
    """The textbook loop in fp64: ``iters`` normalised products ``A v`` from the same start vector."""
    a = a.double()
    v = linalg._start_vector(a.shape[-1], torch.float64, a.device).expand(*a.shape[:-1]).unsqueeze(-1)
    for _ in range(iters):
        w = a @ v
        v = w / w.norm(dim=-2, keepdim=True)
    return (v.mT @ a @ v).squeeze(-1).squeeze(-1)


@pytest.mark.parametrize("n", [48, 300])
def test_power_iteration_by_squaring_matches_the_plain_steps(n):
    # iters=32 runs as 4 products with (A / ||A||)^8: it must give the plain 32-step estimate (fp64 oracle),
    # on spectra whose top eigenvalues are close (where the number of steps matters) and on wide ones
    g = torch.Generator().manual_seed(n)
    q, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=torch.float64))
    spectra = torch.stack(
        [
            torch.logspace(0, -6, n, dtype=torch.float64),
            torch.cat([torch.tensor([1.0, 0.97, 0.95], dtype=torch.float64), torch.rand(n - 3, generator=g) * 0.9]),
            torch.rand(n, generator=g, dtype=torch.float64) * 1e4,
        ]
    )
    a = (q * spectra[:, None, :]) @ q.mT
    est = linalg.power_iteration(a.float(), iters=32)
    ref = _plain_power_iteration(a, 32)
    torch.testing.assert_close(est.double(), ref, rtol=1e-5, atol=0)
    assert torch.all(est.double() <= spectra.amax(-1) * (1 + 1e-5))
    # a zero matrix estimates 0 (the root then uses the identity), not NaN
    assert float(linalg.power_iteration(torch.zeros(1, n, n), iters=32)[0]) == 0.0


def test_bjorck_improves_orthogonality():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 100, 100, generator=g))
    noisy = q + 0.02 * torch.randn(q.shape, generator=g)
    eye = torch.eye(100)
    errs = [
        float((linalg.bjorck_orthonormalize(noisy, k) @ linalg.bjorck_orthonormalize(noisy, k).mT - eye).norm())
        for k in range(4)
    ]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-3 * errs[0]


@pytest.mark.parametrize("rank", [0, 1, 5])
def test_cholesky_rank_deficient_never_nan(rank):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 50, rank, generator=g) * 1e3
    a = x @ x.mT  # PSD with rank `rank` (or zero)
    c, r = linalg.robust_cholesky(a, 1e-6)
    assert torch.isfinite(c).all() and torch.isfinite(r).all() and torch.all(r > 0)
    assert torch.equal(c, torch.tril(c))
    recon = c @ c.mT
    torch.testing.assert_close(
        recon, a + r[:, None, None] * torch.eye(50), rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-6
    )


def test_cholesky_indefinite_and_nonfinite_fall_back():
    a = torch.diag(torch.tensor([1.0, -5.0, 2.0])).expand(2, 3, 3).clone()
    a[1, 0, 0] = float("nan")
    c, r = linalg.robust_cholesky(a, 1e-6)
    assert torch.isfinite(c).all()
    # indefinite matrix -> diagonal fallback sqrt(max(diag, 0) + r)
    torch.testing.assert_close(c[0].diagonal(), torch.tensor([1.0, 0.0, 2.0]).add(r[0]).sqrt())
    assert torch.equal(c[1], torch.eye(3))  # non-finite input -> identity factor


def test_cholesky_jitter_retry_recovers_nearly_singular():
    a = spd(60, 1e12, batch=2).float()  # fails in fp32 with a tiny ridge
    c, r = linalg.robust_cholesky(a, 1e-12)
    assert torch.isfinite(c).all()
    recon = c.double() @ c.double().mT
    assert rel_err(recon, a.double() + r.double()[:, None, None] * torch.eye(60, dtype=torch.float64)) < 1e-3


def test_sync_free_paths_match_host_checked_paths():
    # accelerators skip host checks (no device sync): same Cholesky, same root to fp32 precision
    a = torch.cat([spd(60, 1e12, batch=2).float(), spd(60, 1e2, batch=2, seed=3).float()])
    c1, r1 = linalg.robust_cholesky(a, 1e-12, host_checks=True)
    c2, r2 = linalg.robust_cholesky(a, 1e-12, host_checks=False)
    assert torch.equal(c1, c2) and torch.equal(r1, r2)
    b = spd(64, 1e6).float()
    x1 = linalg.inverse_root_newton(b, ridge_eps=1e-6, max_iters=25, host_checks=True)
    x2 = linalg.inverse_root_newton(b, ridge_eps=1e-6, max_iters=25, host_checks=False)
    assert rel_err(x2, x1.double()) < 1e-4
    bad = b.clone()
    bad[0, 0, 0] = float("nan")
    x3 = linalg.inverse_root_newton(bad, host_checks=False)  # no fp64 redo without host checks
    assert torch.equal(x3[0], torch.eye(64)) and torch.isfinite(x3).all()


def test_cholesky_attempt_reports_failures_without_retrying():
    a = spd(48, 1e3, batch=3).float()
    a[1] = -a[1]  # indefinite
    c, ridge, ok = linalg.cholesky_attempt(a, 1e-6, torch.ones(3))
    assert ok.tolist() == [True, False, True]
    top = a.diagonal(dim1=-2, dim2=-1).amax(-1)
    torch.testing.assert_close(ridge[0], 1e-6 * top[0])
    rebuilt = c[0].double() @ c[0].double().T
    assert rel_err(rebuilt, a[0].double() + ridge[0].double() * torch.eye(48, dtype=torch.float64)) < 1e-5
    # a raised jitter multiplies the ridge, and never goes below n * eps32 * max diag
    _, ridge_up, _ = linalg.cholesky_attempt(a, 1e-6, torch.tensor([100.0, 1.0, 1e4]))
    floor = 48 * torch.finfo(torch.float32).eps * top[0]
    torch.testing.assert_close(ridge_up[0], torch.maximum(1e-4 * top[0], floor))
    torch.testing.assert_close(ridge_up[2], torch.maximum(1e-2 * top[2], floor))


def test_newton_schedule_reaches_the_fixed_point_on_its_design_interval():
    for eps in (1e-6, 1e-4, 1e-3):
        steps = linalg.newton_schedule(4, eps)
        assert len(steps) <= 11  # plain Newton needs ~19 at eps = 1e-6 (docstring)
        m = torch.logspace(math.log10(eps / (linalg.NEWTON_HEADROOM + eps)), 0, 500, dtype=torch.float64)
        for a, b in steps:
            t = a - b * m
            assert bool((t > 0).all())  # X stays positive definite
            m = m * t**4
        assert float((m - 1).abs().max()) < 1e-6
