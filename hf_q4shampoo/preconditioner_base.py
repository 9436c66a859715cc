"""What every preconditioner form shares: the interface :class:`PreconditionerForm` with its storage helpers
(symmetric matrices and roots in fp32 or 4 bit, the root's decoding, bytes by kind), the row-wise select
``_update_rows``, ``state_order``, ``tensor_bytes``, and :class:`FormSettings`, what a form reads.

The interface and the forms are described in ``preconditioners.py``, which holds the forms' registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from . import linalg, triton_kernels
from .config import Q4ShampooConfig
from .kernels import mark_batch_dynamic, maybe_compiled
from .quant import (
    RESIDUAL_KEYS,
    SYMMETRIC_KEYS,
    decode_symmetric,
    dequantize_diagreal,
    quantize_diagreal,
    quantize_symmetric,
    stored_diagonal,
    symmetric_decode_tables,
)

__all__ = ["State", "FormSettings", "PreconditionerForm", "tensor_bytes", "state_order"]

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
    """How one side of a Kronecker preconditioner is stored and updated (see ``preconditioners``' docstring)."""

    name: str = ""

    def __init__(self, settings: FormSettings):
        self.s = settings

    # ---- helpers shared by the forms -----------------------------------------------------------
    def quantized(self, n: int) -> bool:
        return n * n >= self.s.min_quant_numel

    def _eye(self, n: int, k: int, device: torch.device) -> torch.Tensor:
        return torch.eye(n, device=device).expand(k, n, n).contiguous()

    def _store_symmetric(self, x: torch.Tensor, prefix: str, quantize: bool) -> State:
        """fp32, or fp32 diagonal + 4-bit off-diagonal (paper 2's DiagReal; the naive form's statistics)."""
        if quantize:
            q = quantize_diagreal(x, self.s.quant_map, self.s.quant_block_size)
            return {f"{prefix}_{key}": v for key, v in q.items()}
        return {prefix: x.float().contiguous()}

    def _load_symmetric(self, state: State, prefix: str) -> torch.Tensor:
        if prefix in state:
            return state[prefix]
        q = {key: state[f"{prefix}_{key}"] for key in ("codes", "scales", "diag")}
        return dequantize_diagreal(q, self.s.quant_map, self.s.quant_block_size)

    def _root_quantized(self, n: int) -> bool:
        return self.s.root_bits in (4, 8) and self.quantized(n)

    def _store_root(self, root: torch.Tensor, n: int) -> State:
        """The inverse roots as ``root_bits`` says: fp32 (``root``), or a diagonal (fp16 over an fp32 scale) and the
        strict lower triangle in 4 bit (``root_codes`` / ``root_scales`` / ``root_scale_exp`` / ``root_diag`` /
        ``root_diag_scale``; ``quant.quantize_symmetric``), with ``root_bits=8`` plus a second 4-bit code of what
        the first one left (``root_res_codes`` / ``root_res_scales`` / ``root_res_scale_exp``)."""
        if not self._root_quantized(n):
            return {"root": root.float().contiguous()}
        q = quantize_symmetric(root, self.s.quant_map, self.s.quant_block_size, refine=self.s.root_bits == 8)
        return {f"root_{key}": v for key, v in q.items()}

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
        one.update(self._store_root(self._eye(n, 1, device), n))
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
        _update_rows(state, self._store_root(root, n), ok)

    def root(self, state: State, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored inverse roots, decoded to ``dtype`` (on accelerators by one fused kernel, which also adds
        ``root_bits=8``'s second code)."""
        if "root" in state:
            return state["root"].to(dtype)
        diag = state["root_diag"]
        n, device = diag.shape[-1], diag.device
        if n < 2:
            return torch.diag_embed(stored_diagonal(diag, state["root_diag_scale"])).to(dtype)
        stored = [state[f"root_{key}"] for key in SYMMETRIC_KEYS]
        residual = [state[f"root_{key}"] for key in RESIDUAL_KEYS] if "root_res_codes" in state else []
        table, fractions, gather = symmetric_decode_tables(n, self.s.quant_map, device)
        block = self.s.quant_block_size
        if device.type == "cuda" and self.s.use_compile and triton_kernels.HAS_TRITON:
            return triton_kernels.decode_symmetric(*stored, table, fractions, block, dtype, *residual)
        # the number of stacked roots changes as parameters join a bucket: keep that dimension dynamic,
        # the matrix order static (one compilation per order)
        decode = maybe_compiled(decode_symmetric, device, self.s.use_compile)
        if decode is not decode_symmetric:
            mark_batch_dynamic(*stored, *residual)
        return decode(*stored, table, fractions, gather, block, dtype, *residual)

    def bytes_by_kind(self, state: State) -> dict[str, int]:
        out = {"roots": 0, "statistics": 0, "error_feedback": 0, "scales_diagonals": 0}
        for key, t in state.items():
            out[self._kind_of(key)] += tensor_bytes(t)
        return out

    def _kind_of(self, key: str) -> str:
        if key.startswith("root"):
            return "roots" if key in ("root", "root_codes", "root_res_codes") else "scales_diagonals"
        decoders = ("_scales", "_diag", "_upper_scale", "_scale_exp", "_diag_scale")
        if key.endswith(decoders) or key in ("eigenvalues", "ridge", "diag", "jitter"):
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
