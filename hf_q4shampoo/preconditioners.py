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
symmetric): half the codes, and the decoded root is exactly symmetric (``quant.quantize_symmetric``).
``root_bits == 8`` adds a second 4-bit code of the first one's residual (``root_res_*``; twice the root codes). Sides
whose ``n * n`` is below ``min_quant_numel`` stay fp32 in every form (paper 2's ``min_lowbit_size``).

This module holds the ``fp32``, ``naive`` and ``eigen`` forms and the registry (``FORMS``, ``make_form``); the
interface and :class:`FormSettings` are in ``preconditioner_base.py``, the two Cholesky forms in
``cholesky_form.py`` (all of them importable from here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import linalg
from .cholesky_form import CholeskyForm
from .preconditioner_base import FormSettings, PreconditionerForm, State, tensor_bytes
from .quant import dequantize_blockwise, quantize_blockwise

__all__ = ["FormSettings", "PreconditionerForm", "FORMS", "make_form", "tensor_bytes"]


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
        return self._store_symmetric(self.s.matrix_eps * self._eye(n, k, device), "stats", self.quantized(n))

    def statistics(self, state):
        return self._load_symmetric(state, "stats")

    def update_statistics(self, state, gram):
        n = gram.shape[-1]
        new = self._blend(self.statistics(state), gram)
        state.update(self._store_symmetric(new, "stats", self.quantized(n)))


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
        state.update(self._store_root(root, s.shape[-1]))


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
