"""Batched linear algebra for Shampoo: inverse p-th roots, Björck steps, power iteration, Cholesky.

Every function takes a stack of matrices ``(..., n, n)`` and works on all of them at once. Nothing
here knows about quantization.

Ridges are *relative*: ``eps * lambda_max`` (paper 2's code, papers.md §1.2), so the result does
not depend on the scale of the gradients.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache

import torch

__all__ = [
    "symmetrize",
    "eye_like",
    "power_iteration",
    "inverse_root_eigh",
    "inverse_root_newton",
    "matrix_inverse_root",
    "bjorck_orthonormalize",
    "robust_cholesky",
    "cholesky_attempt",
    "newton_schedule",
    "inverse_root_scheduled",
    "inverse_root_checked",
    "tf32_matmul",
    "fp32_matmul",
    "CHOLESKY_JITTER_STEPS",
]

# Relative jitter multipliers tried, in order, when a Cholesky factorisation fails.
CHOLESKY_JITTER_STEPS = (1.0, 1e2, 1e4)


def symmetrize(a: torch.Tensor) -> torch.Tensor:
    return (a + a.mT) * 0.5


def eye_like(a: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    return torch.eye(n, dtype=a.dtype, device=a.device).expand_as(a)


_START_VECTORS: dict[tuple, torch.Tensor] = {}


def _start_vector(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Deterministic "random" start (uniform in (-1, 1) as in paper 2's PowerIter) so that a run is
    # reproducible and a resumed run is identical without saving RNG state. Cached per device: copying it
    # from host memory at every refresh made the host wait for the GPU's queue (docs/perf_notes.md v8).
    key = (n, dtype, torch.device(device))
    vector = _START_VECTORS.get(key)
    if vector is None:
        gen = torch.Generator().manual_seed(1234 + n)
        vector = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1).to(device=device, dtype=dtype)
        _START_VECTORS[key] = vector
    return vector


def power_iteration(a: torch.Tensor, iters: int = 32) -> torch.Tensor:
    """Estimate the largest eigenvalue of symmetric PSD matrices ``(..., n, n)``; returns ``(...,)``.

    Paper 2 uses 10 iterations; when the top two eigenvalues are close that can miss lambda_max by
    20% (measured on log-spaced spectra), which moves the relative ridge by as much. The Rayleigh quotient
    returned is a lower bound of lambda_max.

    ``iters`` products ``A v`` from the fixed start vector: when ``iters`` is a multiple of 8 they run as
    ``iters / 8`` products with ``B^8``, ``B = A / ||A||_F`` (three squarings: the same directions up to
    rounding, since ``B^8 v`` is parallel to ``A^8 v``). On a GPU each of the 32 matrix-vector steps was
    four kernel launches, ~130 per call, which left the GPU waiting for the host in refresh steps
    (docs/perf_notes.md v13); the squarings cost three O(n^3) products, a few percent of the Newton root's 40.
    """
    v = _start_vector(a.shape[-1], a.dtype, a.device).expand(*a.shape[:-1]).unsqueeze(-1)
    v = v / v.norm(dim=-2, keepdim=True)
    tiny = torch.finfo(a.dtype).tiny
    b, steps = a, iters
    if iters % 8 == 0:
        # ||A||_F >= lambda_max, so B's spectrum lies in [0, 1] and B^8 cannot overflow; its top eigenvalue
        # is at least n^-4 (lambda_max >= ||A||_F / sqrt(n)), far above fp32's smallest normal number
        b = a / torch.linalg.matrix_norm(a).clamp_min(tiny)[..., None, None]
        for _ in range(3):
            b = b @ b
        steps = iters // 8
    for _ in range(steps):
        w = b @ v
        v = w / w.norm(dim=-2, keepdim=True).clamp_min(tiny)
    return (v.mT @ a @ v).squeeze(-1).squeeze(-1).clamp_min(0.0)


def _finite_per_matrix(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(-2).all(-1)


def inverse_root_eigh(a: torch.Tensor, p: int = 4, ridge_eps: float = 1e-6) -> torch.Tensor:
    """``(A + eps * lambda_max I)^(-1/p)`` by a symmetric eigendecomposition.

    Computed in fp32; matrices whose decomposition fails, is not finite, or is too ill-conditioned
    for fp32 to resolve at this ridge are redone in fp64.
    Negative eigenvalues (from rounding or from a lossy reconstruction of A) are clamped to 0 before
    the ridge is added. An all-zero matrix gives the identity.
    """
    out_dtype = a.dtype
    n = a.shape[-1]
    try:
        evals, evecs = torch.linalg.eigh(symmetrize(a.float()))
        failed = ~(_finite_per_matrix(evecs) & torch.isfinite(evals).all(-1))
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        evals = evecs = None
    if evals is None:
        evals, evecs = torch.linalg.eigh(symmetrize(a.double()))
        return _root_from_eigh(evals, evecs, p, ridge_eps).to(out_dtype)
    # fp32 eigenvalues carry an absolute error of roughly sqrt(n) * eps32 * lambda_max; where the
    # smallest shifted eigenvalue is within 100x of that, fp32 cannot resolve the root: redo in fp64.
    lam_max = evals.amax(-1)
    noise = 100.0 * math.sqrt(n) * torch.finfo(torch.float32).eps * lam_max
    unreliable = failed | (evals.amin(-1).clamp_min(0.0) + ridge_eps * lam_max < noise)
    root = _root_from_eigh(evals, evecs, p, ridge_eps)
    if bool(unreliable.any()):
        # only those matrices: each root must not depend on which other matrices share its batch (under DDP
        # the owner of a factor refreshes it in another batch than one process would, and must match it)
        e64, v64 = torch.linalg.eigh(symmetrize(a[unreliable].double()))
        root[unreliable] = _root_from_eigh(e64, v64, p, ridge_eps).to(root.dtype)
    return root.to(out_dtype)


def _root_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, p: int, ridge_eps: float) -> torch.Tensor:
    """``V diag((lambda + eps lambda_max)^(-1/p)) V^T`` from an eigendecomposition (negative eigenvalues as 0;
    an all-zero matrix gives the identity), symmetrized, in the decomposition's dtype."""
    evals = evals.clamp_min(0.0)
    lam_max = evals.amax(-1, keepdim=True)
    ridge = ridge_eps * lam_max
    inv = (evals + ridge).pow(-1.0 / p)
    zero = lam_max <= 0
    inv = torch.where(zero, torch.ones_like(inv), inv)
    root = (evecs * inv.unsqueeze(-2)) @ evecs.mT
    return symmetrize(root)


def inverse_root_newton(
    a: torch.Tensor,
    p: int = 4,
    ridge_eps: float = 1e-6,
    max_iters: int = 40,
    tol: float = 1e-6,
    host_checks: bool | None = None,
) -> torch.Tensor:
    """``(A + eps * lambda_max I)^(-1/p)`` by the coupled Newton iteration (Guo & Higham 2006).

    Paper 2's ``ComputePower`` (with ``lambda_max`` from power iteration) iterates plain Newton steps until
    ``max|M - I| <= tol``; here the steps follow :func:`newton_schedule` (the same fixed point in about
    half the iterations, with no data-dependent stopping), see :func:`inverse_root_scheduled`.
    ``max_iters`` caps the schedule's length. A matrix whose result is not finite or did not converge is
    recomputed with :func:`inverse_root_eigh` in fp64 when ``host_checks`` (default: on CPU, where reading
    the flag is free), and gets the identity otherwise (no host sync; grafting keeps the step's norm).
    """
    x, ok = inverse_root_scheduled(a, p, ridge_eps, tol, max_iters=max_iters)
    host = a.device.type == "cpu" if host_checks is None else host_checks
    if host:
        if not bool(ok.all()):
            x = x.clone()
            x[~ok] = inverse_root_eigh(a[~ok].double(), p, ridge_eps).to(x.dtype)
        return x
    return torch.where(ok[..., None, None], x, eye_like(x))


def matrix_inverse_root(
    a: torch.Tensor, p: int = 4, ridge_eps: float = 1e-6, method: str = "eigh", **kw
) -> torch.Tensor:
    """Dispatch to :func:`inverse_root_eigh` or :func:`inverse_root_newton` (``method``)."""
    if method == "eigh":
        return inverse_root_eigh(a, p, ridge_eps)
    if method == "newton":
        return inverse_root_newton(a, p, ridge_eps, **kw)
    raise ValueError(f"unknown inverse-root method {method!r}; allowed: 'eigh', 'newton'")


def inverse_root_checked(
    a: torch.Tensor, p: int, ridge_eps: float, method: str, **kw
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(root, ok)``: like :func:`matrix_inverse_root`, but Newton's failures are reported, not replaced,
    so that the caller can keep the previous root of a failed matrix (no host sync on accelerators)."""
    if method == "eigh":
        x = inverse_root_eigh(a, p, ridge_eps)
        return x, torch.ones(a.shape[:-2], dtype=torch.bool, device=a.device)
    if method == "newton":
        if a.device.type == "cpu":  # fp64 eigh fallback is free to decide on the host
            x = inverse_root_newton(a, p, ridge_eps, **kw)
            return x, torch.ones(a.shape[:-2], dtype=torch.bool, device=a.device)
        return inverse_root_scheduled(a, p, ridge_eps, kw.get("tol", 1e-6), max_iters=kw.get("max_iters", 40))
    raise ValueError(f"unknown inverse-root method {method!r}; allowed: 'eigh', 'newton'")


def bjorck_orthonormalize(v: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` Björck steps ``V <- 1.5 V - 0.5 V V^T V`` (paper 2 Eq. 2)."""
    for _ in range(iters):
        v = 1.5 * v - 0.5 * (v @ v.mT @ v)
    return v


def cholesky_attempt(
    a: torch.Tensor, rel_eps: float, jitter: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Cholesky factorisation of ``A + r I`` per matrix, ``r = rel_eps * jitter * max_i A_ii``; no host sync.

    The sync-free counterpart of :func:`robust_cholesky` for accelerators: instead of retrying at once
    (which needs the host to read which matrices failed), the caller keeps a failed matrix's previous
    factor and raises its ``jitter`` for the next update. Retries (``jitter > 1``) use at least
    ``n * eps32 * max_i A_ii``, as in :func:`robust_cholesky`. Returns ``(C, r, ok)``; ``C`` is only
    meaningful where ``ok``. Products run in IEEE fp32.
    """
    work = symmetrize(a.float())
    finite = _finite_per_matrix(work)
    work = torch.where(finite[..., None, None], work, eye_like(work))
    top = work.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(0.0)
    base = rel_eps * top
    base = torch.where(base > 0, base, torch.full_like(base, torch.finfo(torch.float32).tiny ** 0.5))
    floor = a.shape[-1] * torch.finfo(torch.float32).eps * top
    ridge = torch.where(jitter > 1, torch.maximum(base * jitter, floor), base)
    c, info = torch.linalg.cholesky_ex(work + ridge[..., None, None] * eye_like(work))
    ok = (info == 0) & _finite_per_matrix(c) & finite
    return c, ridge, ok


def robust_cholesky(
    a: torch.Tensor, rel_eps: float = 1e-6, host_checks: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of ``A + r I`` for symmetric PSD ``A``, never NaN; returns ``(C, r)``.

    The ridge is relative to the largest diagonal entry, ``r = rel_eps * max_i A_ii`` (a cheap
    upper-bound proxy for ``lambda_max``, within a factor n of it). A matrix whose factorisation
    fails is retried with the ridge multiplied by each of :data:`CHOLESKY_JITTER_STEPS`; if it still
    fails (retries use at least ``n * eps32 * max_i A_ii``, enough for any PSD matrix in fp32), or A is
    not finite, the documented fallback is the *diagonal* factor
    ``diag(sqrt(max(A_ii, 0) + r))``, which keeps the scale of each coordinate and drops the
    correlations of that block for this update. ``r`` (shape ``(...,)``) is the ridge actually
    used, so a caller can subtract it after reconstructing ``C C^T``.
    """
    work = symmetrize(a.float())
    finite = _finite_per_matrix(work)
    work = torch.where(finite[..., None, None], work, eye_like(work))
    diag = work.diagonal(dim1=-2, dim2=-1)
    base = rel_eps * diag.amax(-1).clamp_min(0.0)
    base = torch.where(base > 0, base, torch.full_like(base, torch.finfo(torch.float32).tiny ** 0.5))
    eye = eye_like(work)
    chol = None
    ridge = base
    failed = torch.ones_like(base, dtype=torch.bool)
    n = a.shape[-1]
    # A retry's ridge is at least n * eps32 * max diag: Cholesky's backward error, so it succeeds on
    # any PSD matrix rounded to fp32.
    floor = n * torch.finfo(torch.float32).eps * diag.amax(-1).clamp_min(0.0)
    # Stop at the first attempt that succeeds everywhere: one host sync per call (measured cheaper on an
    # H100 than running every attempt: 1.7 ms per attempt for 6 factors of order 1024). With
    # ``host_checks=False`` every attempt runs and the first successful one is selected: same result.
    host = True if host_checks is None else host_checks
    for attempt, mult in enumerate(CHOLESKY_JITTER_STEPS):
        r = base * mult if attempt == 0 else torch.maximum(base * mult, floor)
        c, info = torch.linalg.cholesky_ex(work + r[..., None, None] * eye)
        ok = (info == 0) & _finite_per_matrix(c)
        if chol is None:
            chol, ridge = c, r
        else:
            take = failed & ok
            chol = torch.where(take[..., None, None], c, chol)
            ridge = torch.where(take, r, ridge)
        failed = failed & ~ok
        if host and not bool(failed.any()):
            break
    assert chol is not None
    fallback = torch.diag_embed((diag.clamp_min(0.0) + ridge.unsqueeze(-1)).sqrt())
    chol = torch.where(failed[..., None, None], fallback, chol)
    chol = torch.where(finite[..., None, None], chol, eye)
    return chol, ridge


# ----------------------------------------------------------------------------------------------------
# IEEE fp32 products on accelerators, whatever the process-wide TF32 setting
# ----------------------------------------------------------------------------------------------------


@contextmanager
def _matmul_precision(tf32: bool):
    """Set CUDA float32 matrix products to TF32 or IEEE fp32 inside the block, then restore the setting."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        name, value = "fp32_precision", "tf32" if tf32 else "ieee"
    else:  # pragma: no cover - torch < 2.9
        name, value = "allow_tf32", tf32
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def fp32_matmul():
    """Run CUDA float32 matrix products in IEEE fp32 inside the block (TF32 off), then restore the setting.

    The Trainer's ``--tf32`` (and ``torch.backends.cuda.matmul.allow_tf32 = True``) would otherwise turn
    the roots' and factorisations' fp32 products into TF32 ones, whose 10-bit mantissa loses the small
    eigenvalues that Shampoo exists to amplify (docs/perf_notes.md v4: NRE 0.45 against fp64 at eps 1e-6).
    """
    return _matmul_precision(False)


def tf32_matmul(enabled: bool = True):
    """CUDA float32 products inside the block in TF32 when ``enabled``, else in IEEE fp32 (restored after).

    Only for Gram products ``X X^T``: TF32 rounds each input to a 10-bit mantissa and accumulates in fp32,
    so the result is the exact Gram matrix of a slightly rounded X (relative 2^-11 per entry), still PSD
    (docs/perf_notes.md v6). Not for the Newton iteration (v4).
    """
    return _matmul_precision(enabled)


# ----------------------------------------------------------------------------------------------------
# Inverse p-th roots by a coupled iteration with a precomputed polynomial schedule
# ----------------------------------------------------------------------------------------------------

#: Assumed bound of lambda_max over its power-iteration estimate (a lower bound); the schedule is designed
#: for spectra up to this much above the estimate and stays positive definite up to 1 / NEWTON_D_MAX above it.
NEWTON_HEADROOM = 1.1
NEWTON_D_MAX = 0.6


@lru_cache(maxsize=64)
def newton_schedule(
    p: int, ridge_eps: float, tol: float = 1e-6, max_iters: int = 40
) -> tuple[tuple[float, float], ...]:
    """Coefficients ``(a, b)`` of ``T_k = a I - b M_k`` for the coupled iteration ``X <- X T, M <- T^p M``.

    Every ``T_k`` is a polynomial in A, so ``M_k = X_k^p A`` holds at every step (all matrices commute) and
    ``M -> I`` means ``X -> A^(-1/p)``. The plain Newton step is ``a = (p + 1) / p, b = 1 / p``; near a
    small eigenvalue it grows ``m`` only by ``((p + 1) / p)^p`` (2.44 for p = 4), so a spectrum of width
    ``1 / ridge_eps = 1e6`` needs ~19 steps. Here the spectrum's bounds are known in advance (after the
    scaling done by :func:`inverse_root_newton` it lies in ``[ridge_eps / h, 1]``, h = NEWTON_HEADROOM), so
    each step can be chosen on the host, once per (p, ridge_eps): while the spectrum is wide, the step
    ``T = alpha (I - d M)`` that shrinks its condition number the most (about 7x per step for p = 4 instead
    of 2.44x), then scaled Newton steps that bring every eigenvalue of M to 1 within ``tol``. The result is
    the same fixed point with 10 steps instead of 19 at ridge_eps = 1e-6 (7 instead of 11 at 1e-3), the
    same four matrix products per step, and no data-dependent stopping (no host sync).
    The design tracks the image of a dense log-spaced grid of the interval, so its guarantees hold on that grid.
    """
    grid = torch.logspace(math.log10(ridge_eps / (NEWTON_HEADROOM + ridge_eps)), 0.0, 3000, dtype=torch.float64)
    m = grid
    steps: list[tuple[float, float]] = []
    d_grid = torch.linspace(0.2, NEWTON_D_MAX, 41, dtype=torch.float64)
    for _ in range(max_iters):
        if float((m - 1).abs().max()) < tol:
            return tuple(steps)
        top = float(m.max())
        if float(m.max() / m.min()) > 10.0:
            # widest-first phase: pick d minimising the condition number of the image
            images = m * (1 - d_grid[:, None] * m / top) ** p
            kappa = images.amax(-1) / images.amin(-1)
            d = float(d_grid[int(kappa.argmin())]) / top
            image = m * (1 - d * m) ** p
            alpha = float(image.max()) ** (-1.0 / p)
            a, b = alpha, alpha * d
        else:
            # scaled Newton: M <- c M first (c chosen on the grid to minimise the final error)
            cs = torch.linspace(0.5, 1.5 / top, 401, dtype=torch.float64)
            mm = cs[:, None] * m
            err = (mm * ((p + 1 - mm) / p) ** p - 1).abs().amax(-1)
            c = float(cs[int(err.argmin())])
            a, b = (p + 1) / p * c ** (1.0 / p), c ** (1.0 + 1.0 / p) / p
        steps.append((a, b))
        m = m * (a - b * m) ** p
    raise RuntimeError(f"no Newton schedule reaches tol {tol:g} within {max_iters} steps for ridge_eps {ridge_eps:g}")


def inverse_root_scheduled(
    a: torch.Tensor, p: int = 4, ridge_eps: float = 1e-6, tol: float = 1e-6, accept: float = 1e-3, max_iters: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A + eps * lambda_max I)^(-1/p)`` by the coupled iteration with :func:`newton_schedule`'s steps.

    Returns ``(X, ok)``: ``ok`` (shape ``(...,)``) is False where the result is not finite or where
    ``max|X^p A - I|`` stays above ``accept`` (lambda_max underestimated by more than the schedule's
    headroom, or a matrix that is not PSD); the caller decides what such a matrix gets. No host sync.
    Products run in IEEE fp32 (:func:`fp32_matmul`) whatever the process's TF32 setting.
    """
    out_dtype = a.dtype
    with fp32_matmul():
        work = symmetrize(a.float())
        eye = eye_like(work)
        lam = power_iteration(work)
        scale = torch.where(lam > 0, lam, torch.ones_like(lam))
        start = 1.0 / (NEWTON_HEADROOM + ridge_eps)
        m = (work / scale[..., None, None] + ridge_eps * eye) * start
        x = None  # X_0 = start^(1/p) I is folded into the first product
        for coef_a, coef_b in newton_schedule(p, ridge_eps, tol, max_iters):
            t = coef_a * eye - coef_b * m
            x = t if x is None else x @ t
            t2 = t @ t
            tp = t2 @ t2 if p == 4 else torch.linalg.matrix_power(t, p)
            m = tp @ m
        if x is None:
            x = eye
        err = (m - eye).abs().flatten(-2).amax(-1)
        x = x * (start / scale).pow(1.0 / p)[..., None, None]
        x = torch.where((lam > 0)[..., None, None], x, eye)
        ok = _finite_per_matrix(x) & (err <= accept)
        return symmetrize(x).to(out_dtype), ok
