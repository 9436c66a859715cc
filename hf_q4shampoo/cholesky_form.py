"""Paper 1's Cholesky forms (``precond="cholesky"`` / ``"cholesky_ef"``): :class:`CholeskyForm`, the storage of
its 4-bit factor (fp32 diagonal, the upper triangle's second matrix) and its statistics update, in eager torch or
through the fused Triton kernels (``triton_kernels.dequantize_factor`` / ``requantize_factor``)."""

from __future__ import annotations

import torch

from . import linalg, triton_kernels
from .preconditioner_base import FormSettings, PreconditionerForm, State, _update_rows, tensor_bytes
from .quant import dequantize_lower_upper, get_code, quantize_lower_upper, roundtrip_log_blockwise

__all__ = ["CholeskyForm"]


class CholeskyForm(PreconditionerForm):
    """Paper 1: 4-bit Cholesky factor (exact fp32 diagonal), optionally with error feedback.

    Storage per side: ``factor_codes`` (one n x n 4-bit buffer: strictly-lower = off-diagonal of
    the factor C, strictly-upper = a second strictly-lower matrix, transposed), ``factor_scales`` +
    ``factor_diag_block_upper_scale`` (one-byte log-grid block scales, and one per row for the straddling block,
    separate for the two triangles) + ``factor_scale_exp`` (the scales' exponent, int32 per factor; see
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
            error_upper = (
                off - torch.tril(roundtrip_log_blockwise(off, self.s.quant_map, self.s.quant_block_size), -1)
            ).mT
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
                state["factor_scale_exp"],
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
            "scale_exp": state["factor_scale_exp"],
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
            residual = x - roundtrip_log_blockwise(x, self.s.quant_map, self.s.quant_block_size)
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
