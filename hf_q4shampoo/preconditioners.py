"""Stored forms of one Shampoo preconditioner side (a Kronecker factor and its inverse root).

Each form keeps, for a stack of K factors of order n, a plain ``dict[str, Tensor]`` whose tensors
all have leading dimension K (so the optimizer can concatenate the states of many blocks and work
on them in one batch). The interface, :class:`PreconditionerForm`:

* ``init_state(n, k, device)``       - statistics ``eps I`` and root ``I`` (Algorithm 4 / Algorithm 3)
* ``update_statistics(state, gram)`` - ``L <- beta L + (1 - beta) G G^T`` in the form's storage
* ``refresh_root(state)``            - recompute and store ``(L + eps lambda_max I)^(-1/4)``
* ``root(state)``                    - the stored inverse root, dequantized to fp32, ``(K, n, n)``
* ``bytes_by_kind(state)``           - state bytes split into memory kinds (see ``memory.py``)

Forms (papers.md):

``fp32``
    32-bit Shampoo, the reference (paper 2 Algorithm 4).
``naive``
    Statistics quantized directly: fp32 diagonal + 4-bit off-diagonal (paper 2's naive scheme,
    paper 1's "VQ" baseline).
``cholesky``
    Paper 1 without error feedback: the lower Cholesky factor of the statistics is kept, diagonal in
    fp32 and off-diagonal in 4 bit.
``cholesky_ef``
    Paper 1's layout (default): as ``cholesky``, and the otherwise unused upper triangle of the same code
    buffer holds either an error-feedback state in 4 bit (paper 1, ``factor_upper="feedback"``) or a second
    4-bit code of the factor's residual (``"refine"``, the default).
``eigen``
    Paper 2: 4-bit eigenvectors (rows of V^T) + fp32 eigenvalues, one QR subspace step per update,
    Björck rectification before updates and roots.

Roots are stored with an fp32 diagonal and 4-bit off-diagonal entries when ``root_bits == 4``, as
paper 2's ``QTensorDiagReal`` does, except that only the strict lower triangle is kept (a root is
symmetric): half the codes, and the decoded root is exactly symmetric (``quant.quantize_symmetric``). Sides
whose ``n * n`` is below ``min_quant_numel`` stay fp32 in every form (paper 2's ``min_lowbit_size``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import linalg, triton_kernels
from .config import Q4ShampooConfig
from .kernels import mark_batch_dynamic, maybe_compiled
from .quant import (
    decode_symmetric,
    dequantize_blockwise,
    dequantize_diagreal,
    dequantize_lower_upper,
    dequantize_symmetric,
    get_code,
    quantize_blockwise,
    quantize_diagreal,
    quantize_lower_upper,
    quantize_symmetric,
    roundtrip_blockwise,
    symmetric_decode_tables,
)

__all__ = ["FormSettings", "PreconditionerForm", "FORMS", "make_form", "tensor_bytes"]

State = dict[str, torch.Tensor]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class FormSettings:
    """What a preconditioner form reads: a view of a :class:`~hf_q4shampoo.config.Q4ShampooConfig` on one device.

    It has no defaults of its own. The config's fields are read through it (``settings.stat_decay`` is
    ``config.stat_decay``); the two choices the config leaves to the device are resolved here, by
    :meth:`for_device`: ``root_method`` (``"auto"``: eigh on CPU, newton on accelerators) and ``gram_tf32``
    (``gram_precision``; ``"auto"``: TF32 Gram products for the quantized forms on CUDA).
    """

    config: Q4ShampooConfig
    root_method: str  # "eigh" or "newton"
    gram_tf32: bool

    @classmethod
    def for_device(cls, config: Q4ShampooConfig, device: torch.device | str) -> FormSettings:
        device = torch.device(device)
        method = config.root_method
        if method == "auto":
            method = "eigh" if device.type == "cpu" else "newton"
        if config.gram_precision == "auto":
            tf32 = device.type == "cuda" and config.precond != "fp32"
        else:
            tf32 = config.gram_precision == "tf32"
        return cls(config, method, tf32)

    @classmethod
    def from_options(cls, device: torch.device | str = "cpu", **options: Any) -> FormSettings:
        """The settings of ``Q4ShampooConfig(**options)`` on ``device`` (for tests and benchmarks)."""
        return cls.for_device(Q4ShampooConfig.from_kwargs(**options), device)

    def replace(self, **options: Any) -> FormSettings:
        """The same device choices over a config with some fields changed (``root_method`` too, if given)."""
        method = options.get("root_method", self.root_method)
        return FormSettings(
            self.config.replace(**options), self.root_method if method == "auto" else method, self.gram_tf32
        )

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the config's
        if name == "config":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.config, name)


class PreconditionerForm(ABC):
    """How one side of a Kronecker preconditioner is stored and updated (see module docstring)."""

    name: str = ""

    def __init__(self, settings: FormSettings):
        self.s = settings

    # ---- helpers shared by the forms -----------------------------------------------------------
    def quantized(self, n: int) -> bool:
        return n * n >= self.s.min_quant_numel

    def _eye(self, n: int, k: int, device: torch.device) -> torch.Tensor:
        return torch.eye(n, device=device).expand(k, n, n).contiguous()

    def _store_symmetric(self, x: torch.Tensor, prefix: str, quantize: bool, packed: bool) -> State:
        """fp32, or fp32 diagonal + 4-bit off-diagonal: the full matrix (paper 2's DiagReal) or,
        with ``packed``, only its strict lower triangle (half the codes; used for the roots)."""
        if quantize:
            encode = quantize_symmetric if packed else quantize_diagreal
            q = encode(x, self.s.quant_map, self.s.quant_block_size)
            return {f"{prefix}_{key}": v for key, v in q.items()}
        return {prefix: x.float().contiguous()}

    def _load_symmetric(self, state: State, prefix: str, packed: bool) -> torch.Tensor:
        if prefix in state:
            return state[prefix]
        q = {key: state[f"{prefix}_{key}"] for key in ("codes", "scales", "diag")}
        decode = dequantize_symmetric if packed else dequantize_diagreal
        return decode(q, self.s.quant_map, self.s.quant_block_size)

    def _root_quantized(self, n: int) -> bool:
        return self.s.root_bits == 4 and self.quantized(n)

    def _inverse_root(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(root, ok)``; where not ok (a Newton root that did not converge) the caller keeps the old root."""
        return linalg.inverse_root_checked(
            a,
            p=4,
            ridge_eps=self.s.matrix_eps,
            method=self.s.root_method,
            **(
                {"max_iters": self.s.newton_max_iters, "tol": self.s.newton_tol}
                if self.s.root_method == "newton"
                else {}
            ),
        )

    def _blend(self, old: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """``beta old + (1 - beta) gram``; a block whose gram is not finite keeps ``old``.

        (A NaN/Inf gradient would otherwise poison the statistics for good; this needs no host sync.)
        """
        finite = torch.isfinite(gram).flatten(-2).all(-1)[..., None, None]
        gram = torch.where(finite, gram, old)
        beta = self.s.stat_decay
        return beta * old + (1.0 - beta) * gram

    # ---- interface -----------------------------------------------------------------------------
    def init_state(self, n: int, k: int, device: torch.device) -> State:
        # Every factor starts equal (statistics eps I, root I): encode one and repeat it.
        one = self._init_statistics(n, 1, device)
        one.update(self._store_symmetric(self._eye(n, 1, device), "root", self._root_quantized(n), packed=True))
        return {key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in one.items()}

    @abstractmethod
    def _init_statistics(self, n: int, k: int, device: torch.device) -> State: ...

    @abstractmethod
    def statistics(self, state: State) -> torch.Tensor:
        """The statistics matrix the form currently represents, fp32 ``(K, n, n)``."""

    @abstractmethod
    def update_statistics(self, state: State, gram: torch.Tensor) -> None: ...

    def refresh_root(self, state: State) -> None:
        n = state_order(state)
        root, ok = self._inverse_root(self.statistics(state))
        _update_rows(state, self._store_symmetric(root, "root", self._root_quantized(n), packed=True), ok)

    def root(self, state: State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored inverse roots, decoded to ``dtype`` (on accelerators by one fused kernel)."""
        if "root" in state:
            return state["root"].to(dtype)
        n = state["root_diag"].shape[-1]
        if n < 2:
            return self._load_symmetric(state, "root", packed=True).to(dtype)
        device = state["root_diag"].device
        table, gather = symmetric_decode_tables(n, self.s.quant_map, device)
        codes, scales, diag = state["root_codes"], state["root_scales"], state["root_diag"]
        if device.type == "cuda" and self.s.use_compile and triton_kernels.HAS_TRITON:
            return triton_kernels.decode_symmetric(codes, scales, diag, table, self.s.quant_block_size, dtype)
        # the number of stacked roots changes as parameters join a bucket: keep that dimension dynamic,
        # the matrix order static (one compilation per order)
        decode = maybe_compiled(decode_symmetric, device, self.s.use_compile)
        if decode is not decode_symmetric:
            mark_batch_dynamic(codes, scales, diag)
        return decode(codes, scales, diag, table, gather, self.s.quant_block_size, dtype)

    def bytes_by_kind(self, state: State) -> dict[str, int]:
        out = {"roots": 0, "statistics": 0, "error_feedback": 0, "scales_diagonals": 0}
        for key, t in state.items():
            out[self._kind_of(key)] += tensor_bytes(t)
        return out

    def _kind_of(self, key: str) -> str:
        if key.startswith("root"):
            return "roots" if key in ("root", "root_codes") else "scales_diagonals"
        if key.endswith(("_scales", "_diag", "_upper_scale")) or key in ("eigenvalues", "ridge", "diag", "jitter"):
            return "scales_diagonals"
        return "statistics"


def _update_rows(state: State, new: State, ok: torch.Tensor) -> None:
    """``state[key] = new[key]`` for the factors (rows) where ``ok``; the others keep their stored values.

    A sync-free way to skip a failed computation for some factors of a batch (the host never reads ``ok``).
    """
    for key, value in new.items():
        old = state.get(key)
        if old is None or old.shape != value.shape:
            state[key] = value
            continue
        mask = ok.reshape(-1, *([1] * (value.dim() - 1)))
        state[key] = torch.where(mask, value, old)


def state_order(state: State) -> int:
    """The order n of the factors in a side state."""
    for key in ("root_diag", "root"):
        if key in state:
            return state[key].shape[-1]
    raise KeyError("side state has no root entry")


class Fp32Form(PreconditionerForm):
    """32-bit Shampoo (reference)."""

    name = "fp32"

    def _root_quantized(self, n: int) -> bool:
        return False

    def _init_statistics(self, n, k, device):
        return {"stats": self.s.matrix_eps * self._eye(n, k, device)}

    def statistics(self, state):
        return state["stats"]

    def update_statistics(self, state, gram):
        state["stats"] = self._blend(state["stats"], gram)


class NaiveForm(PreconditionerForm):
    """Direct 4-bit quantization of the statistics, fp32 diagonal (paper 2 naive / paper 1 VQ)."""

    name = "naive"

    def _init_statistics(self, n, k, device):
        return self._store_symmetric(
            self.s.matrix_eps * self._eye(n, k, device), "stats", self.quantized(n), packed=False
        )

    def statistics(self, state):
        return self._load_symmetric(state, "stats", packed=False)

    def update_statistics(self, state, gram):
        n = gram.shape[-1]
        new = self._blend(self.statistics(state), gram)
        state.update(self._store_symmetric(new, "stats", self.quantized(n), packed=False))


class CholeskyForm(PreconditionerForm):
    """Paper 1: 4-bit Cholesky factor (exact fp32 diagonal), optionally with error feedback.

    Storage per side: ``factor_codes`` (one n x n 4-bit buffer: strictly-lower = off-diagonal of
    the factor C, strictly-upper = a second strictly-lower matrix, transposed), ``factor_scales`` +
    ``factor_diag_block_upper_scale`` (fp32 block scales, separate for the two triangles; see
    :func:`~hf_q4shampoo.quant.quantize_lower_upper`), ``diag`` (fp32 diagonal of C) and ``ridge``
    (fp32 scalar per factor: the jitter r of the last factorisation, ``C C^T ~ L + r I``).
    Small sides (``n*n < min_quant_numel``) keep C in fp32 as ``factor`` and have no upper triangle.

    What is quantized is ``F = offdiag(C)`` (``factor_scaling="row"``) or ``F = offdiag(C) D^-1`` with
    ``D = diag(C)`` (``"column"``: the unit lower-triangular factor of ``L = F' D^2 F'^T``, LDL^T), in
    blocks along rows. What the upper triangle holds (``cholesky_ef`` only; ``factor_upper``):

    * ``"feedback"`` (paper 1): the error-feedback state E (strictly lower, zero diagonal);
    * ``"refine"``: a second 4-bit code of the first code's residual, ``F ~ D(Q(F)) + D(Q(F - D(Q(F))))``:
      the factor to ~8 bits in the same bytes, no error feedback (docs/results.md §4 measures why).

    Statistics update (every ``update_freq`` steps), for each factor::

        L_old = C C^T - r I          (r removed only if remove_cholesky_ridge; decision D3)
        L     = beta L_old + (1 - beta) G G^T
        C     = chol(L + r' I)       (r' = cholesky_eps * max diag(L), jitter retries; D5)
        feedback:  X = F + E;  store Q(X), diag C;  E = ef_beta E + (1 - ef_beta) (X - D(Q(X)))  (4-bit, upper)
        refine:    store Q(F), diag C and, in the upper triangle, Q(F - D(Q(F)))

    Root (every ``root_freq`` steps): ``(C C^T + eps lambda_max I)^(-1/4)`` from the dequantized
    factor (decision D4), stored as fp32 diagonal + 4-bit off-diagonal.
    """

    name = "cholesky"

    def __init__(self, settings: FormSettings, error_feedback: bool):
        super().__init__(settings)
        self.error_feedback = error_feedback
        self.refine = error_feedback and settings.factor_upper == "refine"
        if error_feedback:
            self.name = "cholesky_ef"

    def _init_statistics(self, n, k, device):
        factor = (self.s.matrix_eps**0.5) * self._eye(n, k, device)  # chol(eps I)
        state = self._store_factor(factor, torch.zeros_like(factor))
        state["ridge"] = torch.zeros(k, device=device)
        state["jitter"] = torch.ones(k, device=device)
        return state

    def _scaled_offdiag(self, c: torch.Tensor) -> torch.Tensor:
        """``F``: the strict lower triangle of ``c``, divided by its column's diagonal entry when ``"column"``."""
        off = torch.tril(c, -1)
        if self.s.factor_scaling == "column":
            off = off / c.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
        return off

    def _store_factor(self, x: torch.Tensor, error_upper: torch.Tensor) -> State:
        """Store factor ``x`` (its ``F`` quantized, diagonal fp32) and ``error_upper`` (strictly upper) in the
        upper triangle; with ``refine`` the upper triangle gets the code of F's residual instead."""
        n = x.shape[-1]
        if not self.quantized(n):
            return {"factor": torch.tril(x).contiguous()}
        off = self._scaled_offdiag(x)
        if self.refine:
            error_upper = (off - torch.tril(roundtrip_blockwise(off, self.s.quant_map, self.s.quant_block_size), -1)).mT
        return self._store_factor_offdiag(off, x.diagonal(dim1=-2, dim2=-1), error_upper)

    def _fused(self, device: torch.device) -> bool:
        # the Triton kernels cover every layout (factor_scaling x factor_upper, with or without the upper matrix)
        return self.s.fused_statistics and device.type == "cuda" and triton_kernels.HAS_TRITON

    def _upper_mode(self) -> str:
        """What the upper triangle holds, in ``triton_kernels``' words: "refine", "feedback" or "none"."""
        return "refine" if self.refine else "feedback" if self.error_feedback else "none"

    def _load_factor(self, state: State) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (C, E) in fp32; E (strictly lower, in the space of F) is None without error feedback state."""
        if "factor" in state:
            return state["factor"], None
        n = state["diag"].shape[-1]
        if self._fused(state["diag"].device):
            table = get_code(self.s.quant_map, state["diag"].device)[0]
            c, upper = triton_kernels.dequantize_factor(
                state["factor_codes"],
                state["factor_scales"],
                state["factor_diag_block_upper_scale"],
                state["diag"],
                table,
                self.s.quant_block_size,
                self._upper_mode(),
                self.s.factor_scaling == "column",
            )
            return c, None if upper is None else upper.mT
        q = {
            "codes": state["factor_codes"],
            "scales": state["factor_scales"],
            "diag_block_upper_scale": state["factor_diag_block_upper_scale"],
        }
        lower, upper = dequantize_lower_upper(q, n, self.s.quant_map, self.s.quant_block_size)
        err = upper.mT
        if self.refine:
            lower, err = lower + err, None
        diag = state["diag"]
        if self.s.factor_scaling == "column":
            lower = lower * diag.unsqueeze(-2)
        return lower + torch.diag_embed(diag), err

    def _gram(self, c: torch.Tensor) -> torch.Tensor:
        with linalg.tf32_matmul(self.s.gram_tf32):
            return c @ c.mT

    def statistics(self, state):
        c, _ = self._load_factor(state)
        return self._gram(c)

    def _factorize(self, a: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(C, ridge, ok)`` of ``a``: retried at once on CPU (``ok`` None: always usable); on accelerators
        one sync-free attempt whose failures keep their old factor and retry with 100x the ridge next time
        (``jitter``, relaxed 10x after each success)."""
        if a.device.type == "cpu":
            c, ridge = linalg.robust_cholesky(a, self.s.cholesky_eps)
            return c, ridge, None
        jitter = state.get("jitter")
        if jitter is None:
            jitter = torch.ones(a.shape[0], device=a.device)
        c, ridge, ok = linalg.cholesky_attempt(a, self.s.cholesky_eps, jitter)
        state["jitter"] = torch.where(ok, (jitter / 10).clamp_min(1.0), (jitter * 100).clamp_max(1e4))
        return c, ridge, ok

    def update_statistics(self, state, gram):
        n = gram.shape[-1]
        c, err = self._load_factor(state)
        old = self._gram(c)
        if self.s.remove_cholesky_ridge:
            old = old - state["ridge"][:, None, None] * torch.eye(n, device=old.device)
        new_c, ridge, ok = self._factorize(self._blend(old, gram), state)
        if "factor" in state:  # fp32 factor: nothing is lost, no error feedback needed
            new = {"factor": new_c.contiguous()}
        elif self._fused(new_c.device):  # the same update in two Triton passes (triton_kernels.py)
            table, mids = get_code(self.s.quant_map, new_c.device)
            stored = triton_kernels.requantize_factor(
                new_c,
                None if err is None else err.mT,
                table,
                mids,
                self.s.quant_block_size,
                self._upper_mode(),
                self.s.factor_scaling == "column",
                self.s.ef_beta,
            )
            new = {f"factor_{k}": v for k, v in stored.items() if k != "diag"}
            new["diag"] = stored["diag"]
        elif not self.error_feedback or self.refine:
            new = self._store_factor(new_c, torch.zeros_like(new_c))
        else:
            x = self._scaled_offdiag(new_c) + err
            residual = x - roundtrip_blockwise(x, self.s.quant_map, self.s.quant_block_size)
            beta_e = self.s.ef_beta
            new_err = beta_e * err + (1.0 - beta_e) * residual
            new = self._store_factor_offdiag(x, new_c.diagonal(dim1=-2, dim2=-1), new_err.mT)
        new["ridge"] = ridge
        if ok is None:
            state.update(new)
        else:
            _update_rows(state, new, ok)

    def _store_factor_offdiag(self, off: torch.Tensor, diag: torch.Tensor, error_upper: torch.Tensor) -> State:
        """Store an already scaled ``F`` (strict lower) with diagonal ``diag`` and the error state."""
        q = quantize_lower_upper(off, error_upper, self.s.quant_map, self.s.quant_block_size)
        state = {f"factor_{key}": v for key, v in q.items()}
        state["diag"] = diag.clone()
        return state

    def _kind_of(self, key):
        if key == "factor_codes":
            return "statistics"  # split into statistics / error_feedback in bytes_by_kind
        return super()._kind_of(key)

    def bytes_by_kind(self, state):
        out = super().bytes_by_kind(state)
        if self.error_feedback and not self.refine and "factor_codes" in state:
            # One buffer holds both triangles: half of it is the error state.
            half = tensor_bytes(state["factor_codes"]) // 2
            out["statistics"] -= half
            out["error_feedback"] += half
        return out


class EigenForm(PreconditionerForm):
    """Paper 2: eigenvector quantization with Björck rectification.

    Storage per side: ``eigvecs_t_codes`` / ``eigvecs_t_scales`` (4-bit V^T, one eigenvector per
    row, blocks inside a row) or ``eigvecs_t`` (fp32, small sides), and ``eigenvalues`` (fp32).
    """

    name = "eigen"

    def _store_vt(self, vt: torch.Tensor) -> State:
        if not self.quantized(vt.shape[-1]):
            return {"eigvecs_t": vt.contiguous()}
        codes, scales = quantize_blockwise(vt, self.s.quant_map, self.s.quant_block_size)
        return {"eigvecs_t_codes": codes, "eigvecs_t_scales": scales}

    def _load_vt(self, state: State, bjorck_iters: int) -> torch.Tensor:
        if "eigvecs_t" in state:
            return state["eigvecs_t"]  # fp32: no rectification needed (as in paper 2's 32-bit path)
        n = state["eigenvalues"].shape[-1]
        vt = dequantize_blockwise(
            state["eigvecs_t_codes"], state["eigvecs_t_scales"], n, self.s.quant_map, self.s.quant_block_size
        )
        return linalg.bjorck_orthonormalize(vt, bjorck_iters)

    def _init_statistics(self, n, k, device):
        state = self._store_vt(self._eye(n, k, device))
        state["eigenvalues"] = torch.full((k, n), self.s.matrix_eps, device=device)
        return state

    def statistics(self, state):
        vt = self._load_vt(state, self.s.bjorck_update_iters)
        return (vt.mT * state["eigenvalues"].unsqueeze(-2)) @ vt

    def update_statistics(self, state, gram):
        vt = self._load_vt(state, self.s.bjorck_update_iters)
        a = self._blend((vt.mT * state["eigenvalues"].unsqueeze(-2)) @ vt, gram)
        v, _ = torch.linalg.qr(a @ vt.mT)  # one subspace iteration warm-started at the old vectors
        state["eigenvalues"] = ((v.mT @ a) * v.mT).sum(-1).clamp_min(0.0)  # Rayleigh quotients
        state.update(self._store_vt(v.mT))

    def refresh_root(self, state):
        vt = self._load_vt(state, self.s.bjorck_root_iters)
        s = state["eigenvalues"]
        ridge = self.s.matrix_eps * s.amax(-1, keepdim=True)
        inv = (s + ridge).clamp_min(torch.finfo(torch.float32).tiny).pow(-0.25)
        root = (vt.mT * inv.unsqueeze(-2)) @ vt
        state.update(self._store_symmetric(root, "root", self._root_quantized(s.shape[-1]), packed=True))


#: The registry of preconditioner forms: ``precond=`` name -> constructor. A new form is a subclass of
#: :class:`PreconditionerForm` above and one entry here; its name goes in ``config.PRECOND_FORMS`` too, which
#: validates user input without importing torch (``tests/test_preconditioners.py`` checks that both agree).
FORMS: dict[str, Callable[[FormSettings], PreconditionerForm]] = {
    "cholesky_ef": lambda settings: CholeskyForm(settings, error_feedback=True),
    "cholesky": lambda settings: CholeskyForm(settings, error_feedback=False),
    "eigen": EigenForm,
    "naive": NaiveForm,
    "fp32": Fp32Form,
}


def make_form(name: str, settings: FormSettings) -> PreconditionerForm:
    """The form ``name`` (a key of :data:`FORMS`) reading ``settings``."""
    try:
        factory = FORMS[name]
    except KeyError:
        raise ValueError(f"unknown precond {name!r}; allowed: {', '.join(FORMS)}") from None
    return factory(settings)
