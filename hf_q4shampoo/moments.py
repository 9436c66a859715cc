"""The first-order moments' storage: which tensors get 4-bit moments, their codes, zero state and bytes.

Their states are 4-bit by default (paper 3, papers.md §4.1):

* signed moments (Adam's m, SGD's momentum): block-wise absmax over the flattened tensor in blocks
  of 128, dynamic-exponent code ("B128/DE"); each block's scale one byte of ``log_scales``' grid, with one
  exponent per tensor (``*_scale_exp``);
* Adam's second moment v: rank-1 normalisation with the zero-free linear code ("Rank-1/Linear");
  1-D tensors fall back to blocks of 128 with the same code;
* tensors with at most 4096 entries stay fp32 (paper 3 App. D.1).

With ``bits=32`` every moment is a plain fp32 tensor.

``m_map="linear2"`` stores the signed moments with paper 2's Linear-2 code instead of the dynamic-exponent one
(which has no -1: a block whose largest entry is negative loses 11% of it at every re-encoding).

With ``v="factored"`` (paper 3's "4-bit Factor", Adafactor's second moment), Adam's v of a tensor with more
than 4096 entries that is a matrix after flattening its trailing dims (``(shape[0], rest)``, both > 1) is
kept as fp32 row and column means of ``g^2`` (``exp_avg_sq_row`` (R,), ``exp_avg_sq_col`` (C,), each an EMA
with ``beta2``) and read as ``v_ij = row_i col_j / mean(row)`` (exact when ``g^2`` is rank one): R + C floats
instead of R * C codes. Its m stays as ``bits`` says; other tensors keep the ``bits`` scheme for v too.

A batch of K same-shape tensors keeps its moments stacked along a leading dimension (``layout.py``); this module
also reads one moment of such a batch in the layout the encoders use and writes a new one back in place. The
steps that update the moments are :mod:`hf_q4shampoo.first_order`'s.
"""

from __future__ import annotations

import math
import re

import torch

from .quant import (
    block_size_of,
    dequantize_log_blockwise,
    dequantize_rank1,
    quantize_log_blockwise,
    quantize_rank1,
)

__all__ = [
    "QUANT_MIN_NUMEL",
    "encode_signed",
    "reencode_signed",
    "decode_signed",
    "block_of",
    "encode_nonneg",
    "decode_nonneg",
    "V_MODES",
    "quantized_moments",
    "factored_shape",
    "first_order_keys",
    "moment_bytes_by_kind",
    "init_first_order_state",
]

QUANT_MIN_NUMEL = 4096  # tensors with at most this many entries keep fp32 moments (paper 3)
SIGNED_BLOCK = 128
State = dict[str, torch.Tensor]
Moments = dict[str, torch.Tensor]  # the batched (K, ...) entries of one moment


V_MODES = ("rank1", "factored")


def quantized_moments(numel: int, bits: int, min_quant_numel: int = QUANT_MIN_NUMEL) -> bool:
    """Whether moments of a tensor with ``numel`` entries are stored in 4 bit (more than ``min_quant_numel``)."""
    return bits == 4 and numel > min_quant_numel


def _is_quantized(moments: State) -> bool:
    """Whether a batch's stored moments are 4-bit (read from the state itself, so a step never disagrees
    with how the state was created)."""
    return any(key.endswith("_codes") for key in moments)


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(rows, cols)`` of a tensor seen as a matrix (the first dim against the product of the rest), or None
    for fewer than two dims."""
    if len(shape) < 2:
        return None
    return shape[0], math.prod(shape[1:])


def is_thin(shape: tuple[int, ...], min_quant_dim: int) -> bool:
    """Whether a tensor's matrix view has a side of at most ``min_quant_dim`` entries (0: never): such tensors
    (LoRA's adapter factors) keep fp32 moments however many entries they have (Q4AdamW's ``min_quant_dim``)."""
    view = matrix_view(shape)
    return min_quant_dim > 0 and view is not None and min(view) <= min_quant_dim


def factored_shape(shape: tuple[int, ...], v: str, min_numel: int = QUANT_MIN_NUMEL) -> tuple[int, int] | None:
    """``(rows, cols)`` of the factored second moment of a tensor of ``shape``, or None if it is not factored
    (``v != "factored"``, fewer than two dims, at most ``min_numel`` entries, or a dim of 1)."""
    view = matrix_view(shape)
    if v != "factored" or view is None or view[0] * view[1] <= min_numel:
        return None
    return view if min(view) > 1 else None


def first_order_keys(state: State) -> list[str]:
    """Keys of ``state`` that belong to the first-order moments."""
    return [k for k in state if k.startswith(("exp_avg", "momentum_buffer"))]


def moment_bytes_by_kind(state: State, numel: int) -> dict[str, int]:
    """Bytes of the first-order moments in ``state`` (of a tensor with ``numel`` entries), by memory kind.

    ``first_order``: the moments themselves (4-bit codes, fp32 tensors, a factored v's row and column
    means); ``scales_diagonals``: what decodes the codes (block scales, rank-1 maxima). One definition for
    every optimizer built on these moments (Q4Shampoo's first-order part, Q4AdamW); kinds without bytes are
    left out.
    """
    out: dict[str, int] = {}
    for key in first_order_keys(state):
        t = state[key]
        kind = "first_order" if key.endswith(("_codes", "_row", "_col")) or t.numel() == numel else "scales_diagonals"
        out[kind] = out.get(kind, 0) + t.numel() * t.element_size()
    return out


# ---------------------------------------------------------------------------------------------
# encode / decode a batch of K moments of one shape; ``x`` is (K, *shape) fp32
# ---------------------------------------------------------------------------------------------


def _encode_blocks(x: torch.Tensor, code: str, block: int = SIGNED_BLOCK) -> Moments:
    """Blocks of ``block`` over each flattened member of ``x`` (K, ...): packed codes, one-byte log-grid scales and
    one exponent per member (``log_scales``)."""
    q = quantize_log_blockwise(x.reshape(x.shape[0], -1), code, block, exponent_dims=1)
    return {f"_{key}": value for key, value in q.items()}


def block_of(m: Moments, numel: int) -> int:
    """The block size a stored block-wise moment of ``numel`` entries per member was encoded with."""
    return block_size_of(numel, m["_scales"].shape[-1])


def _decode_blocks(m: Moments, shape: tuple[int, ...], code: str) -> torch.Tensor:
    numel = math.prod(shape[1:])
    q = {key[1:]: m[key] for key in ("_codes", "_scales", "_scale_exp")}
    return dequantize_log_blockwise(q, numel, code, block_of(m, numel)).reshape(shape)


def encode_signed(x: torch.Tensor, quantized: bool, code: str = "dynamic", block: int = SIGNED_BLOCK) -> Moments:
    if not quantized:
        return {"": x}
    return _encode_blocks(x, code, block)


def reencode_signed(old: Moments, x: torch.Tensor, quantized: bool, code: str = "dynamic") -> Moments:
    """:func:`encode_signed` of a new value of the stored moment ``old``, in ``old``'s block size."""
    block = block_of(old, math.prod(x.shape[1:])) if "_scales" in old else SIGNED_BLOCK
    return encode_signed(x, quantized, code, block)


def decode_signed(m: Moments, shape: tuple[int, ...], code: str = "dynamic") -> torch.Tensor:
    if "" in m:
        return m[""]
    return _decode_blocks(m, shape, code)


def encode_nonneg(x: torch.Tensor, quantized: bool) -> Moments:
    if not quantized:
        return {"": x}
    if x.ndim >= 3:  # batch dim + a tensor of >= 2 dims: rank-1 normalisation
        return {f"_{k}": v for k, v in quantize_rank1(x, batch_dims=1).items()}
    return _encode_blocks(x, "zero_free_linear")


def decode_nonneg(m: Moments, shape: tuple[int, ...]) -> torch.Tensor:
    if "" in m:
        return m[""]
    if "_scales" in m:
        return _decode_blocks(m, shape, "zero_free_linear")
    return dequantize_rank1({k[1:]: v for k, v in m.items()}, shape, batch_dims=1)


_SUFFIX = re.compile(r"(|_codes|_scales|_scale_exp|_max\d+|_row|_col)")


def _scatter(states: list[State], name: str, batched: Moments) -> None:
    """Per-tensor state entries from a batch: codes/scales keep a leading 1, maxima and fp32 moments do not."""
    for suf, value in batched.items():
        parts = value.split(1) if suf in ("_codes", "_scales") else value.unbind(0)
        for state, part in zip(states, parts):
            state[name + suf] = part


def init_first_order_state(
    p: torch.Tensor,
    kind: str,
    bits: int,
    min_quant_numel: int = QUANT_MIN_NUMEL,
    v: str = "rank1",
    m_map: str = "dynamic",
    min_quant_dim: int = 0,
    m_block: int = SIGNED_BLOCK,
) -> State:
    """Zero moments for ``p``: 4-bit when ``bits == 4`` and ``p`` has more than ``min_quant_numel`` entries
    and is not thin (:func:`is_thin`); Adam's v factored when ``v == "factored"`` and ``p`` is a large enough
    matrix (:func:`factored_shape`) that is not thin. A thin tensor's moments are plain fp32. ``m_block``: the
    signed moment's block size (a power of two; later steps keep the one the state was made with)."""

    def zeros(*shape: int) -> torch.Tensor:  # one buffer per moment: fp32 moments are updated in place (fused AdamW)
        return torch.zeros((1, *(shape or p.shape)), dtype=torch.float32, device=p.device)

    thin = is_thin(tuple(p.shape), min_quant_dim)
    quantized = quantized_moments(p.numel(), bits, min_quant_numel) and not thin
    state: State = {}
    if kind == "adamw":
        _scatter([state], "exp_avg", encode_signed(zeros(), quantized, m_map, m_block))
        factored = None if thin else factored_shape(tuple(p.shape), v, min_quant_numel)
        if factored is not None:
            _scatter([state], "exp_avg_sq", {"_row": zeros(factored[0]), "_col": zeros(factored[1])})
        else:
            _scatter([state], "exp_avg_sq", encode_nonneg(zeros(), quantized))
    else:
        _scatter([state], "momentum_buffer", encode_signed(zeros(), quantized, m_map, m_block))
    return state


# ---------------------------------------------------------------------------------------------
# the stacked state of a batch: (K, *per-parameter shape) per state key
# ---------------------------------------------------------------------------------------------


def _member_mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``keep`` (K,) shaped to broadcast over a ``(K, ...)`` tensor."""
    return keep.reshape(-1, *([1] * (like.dim() - 1)))


def _batched(moments: State, name: str) -> Moments:
    """One moment of a batch in the layout the encoders use: codes/scales ``(K, n)``, maxima ``(K, size)``.

    ``moments`` holds the stacked per-parameter state, ``(K, *per-parameter shape)`` (see layout.py).
    """
    out = {}
    for key, value in moments.items():
        if key.startswith(name) and _SUFFIX.fullmatch(key[len(name) :]):
            suffix = key[len(name) :]
            out[suffix] = value.reshape(value.shape[0], -1) if suffix in ("_codes", "_scales") else value
    return out


def _write_back(moments: State, name: str, new: Moments, keep: torch.Tensor | None = None) -> None:
    """Copy a batch's new moment into the stacked state in place (its views stay valid); members whose
    ``keep`` flag is false keep their stored values (codes included, so a skip is exact)."""
    for suffix, value in new.items():
        target = moments[name + suffix]
        value = value.reshape(target.shape)
        target.copy_(value if keep is None else torch.where(_member_mask(keep, target), value, target))
