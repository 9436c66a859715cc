"""4-bit codecs: code tables, block-wise absmax quantization and nibble packing.

Pure PyTorch (CPU and CUDA). Nothing here knows about optimizers.

Conventions (papers.md §3.1, §3.4, §4.2, §6.1):

* A code table is a sorted 1-D fp32 tensor of ``2**bits`` values in [-1, 1] (or (0, 1] for the
  zero-free table). Quantization picks the *nearest* table entry of the normalised value; a value
  exactly on a midpoint takes the lower entry.
* Block-wise absmax normalisation works on the **last** dimension: each row is cut into blocks of
  ``block_size`` contiguous entries (the last block of a row may be shorter), and every block is
  divided by its largest absolute value. Blocks never span two rows, so eigenvector rows and matrix
  rows are normalised on their own (paper 2 requires blocks inside one eigenvector).
* Block scales of the Cholesky factor, the inverse roots and the 4-bit moments (:func:`quantize_lower_upper`,
  :func:`quantize_symmetric`, :func:`quantize_log_blockwise`) take **one byte** each: a point of a log2 grid
  with 16 points per octave, relative to an exponent per matrix (``scale_exp``), the block's absmax rounded to
  the nearest point (within 2.2%) before the block is divided by it (:mod:`hf_q4shampoo.log_scales`).
* The other block scales (the eigen form's eigenvectors, the naive form's statistics: :func:`quantize_blockwise`)
  are stored in **bf16**, each the block's absmax rounded to the nearest bf16 value (:func:`bf16_round`).
* Either way the stored scale is exactly the one the codes were made with. A normalised value may then exceed 1
  by the rounding (2^-8 for bf16, 2.2% on the grid) and takes the end code; so the block's largest entry decodes
  within that of itself instead of exactly, with no bias (round to nearest: rounding up instead would inflate a
  momentum's largest entry at every re-encoding). Every other entry's error is the code's own (a code step is 1/7
  at best).
* Two 4-bit codes share a byte, the even element in the low nibble. Rows are packed separately and
  padded to an even length, so odd row lengths never share a byte between rows (the "odd-order
  hazard" of paper 2's CUDA kernels cannot happen here).
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch

from . import log_scales
from .capture_guard import refuse_in_capture

__all__ = [
    "CODE_NAMES",
    "get_code",
    "linear2_code",
    "dynamic_code",
    "zero_free_linear_code",
    "pack_nibbles",
    "unpack_nibbles",
    "bf16_round",
    "SCALE_DTYPE",
    "encode_blockwise",
    "encode_log_blockwise",
    "block_size_of",
    "quantize_log_blockwise",
    "dequantize_log_blockwise",
    "RESIDUAL_KEYS",
    "SYMMETRIC_KEYS",
    "normalised_diagonal",
    "stored_diagonal",
    "roundtrip_log_blockwise",
    "decode_blockwise",
    "roundtrip_blockwise",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_diagreal",
    "quantize_symmetric",
    "dequantize_symmetric",
    "dequantize_diagreal",
    "quantize_lower_upper",
    "dequantize_lower_upper",
    "quantize_rank1",
    "dequantize_rank1",
]


# --------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------


def linear2_code(bits: int = 4) -> torch.Tensor:
    """Linear-2 ("linear square") map of paper 2, Eq. (3).

    ``R(j) = -(-1 + 2j/(2^b-1))^2`` below the middle index ``2^(b-1)-1``, ``0`` at it and
    ``(-1 + 2j/(2^b-1))^2`` above. The table is asymmetric: it holds +0.0044 but not -0.0044.
    """
    n = 2**bits
    mid = 2 ** (bits - 1) - 1
    values = []
    for j in range(n):
        base = -1.0 + 2.0 * j / (n - 1)
        if j < mid:
            values.append(-(base**2))
        elif j == mid:
            values.append(0.0)
        else:
            values.append(base**2)
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code(bits: int = 4, signed: bool = True) -> torch.Tensor:
    """Dynamic-exponent ("dynamic tree") map of papers 2 and 3.

    The bitsandbytes/lpmm construction with ``max_exponent_bits = bits - 1``: for exponent ``i``
    the fraction grid is the midpoints of ``linspace(0.1, 1, 2^i + 1)`` scaled by
    ``10^(i - (E - 1))``; then 0 and 1.0 are added. For 4 signed bits this gives the table of
    papers.md §3.1 (no -1.0 entry).
    """
    sign_bits = 1 if signed else 0
    non_sign_bits = bits - sign_bits
    max_exponent_bits = bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        grid = torch.linspace(0.1, 1.0, fraction_items, dtype=torch.float64)
        means = ((grid[:-1] + grid[1:]) / 2.0) * (10.0 ** (-(max_exponent_bits - 1) + i))
        values.extend(means.tolist())
        if signed:
            values.extend((-means).tolist())
    values.append(0.0)
    values.append(1.0)
    table = torch.tensor(sorted(values), dtype=torch.float64)
    if table.numel() != 2**bits:  # pragma: no cover - guards the construction above
        raise AssertionError(f"dynamic code has {table.numel()} entries, expected {2**bits}")
    return table.to(torch.float32)


def zero_free_linear_code(bits: int = 4) -> torch.Tensor:
    """Unsigned linear map without zero, ``T(i) = (i + 1) / 2^b`` (paper 3, second moment)."""
    n = 2**bits
    return torch.arange(1, n + 1, dtype=torch.float32) / n


CODE_NAMES = ("linear2", "dynamic", "zero_free_linear")


@cache
def _code_cpu(name: str, bits: int) -> torch.Tensor:
    if name == "linear2":
        return linear2_code(bits)
    if name == "dynamic":
        return dynamic_code(bits, signed=True)
    if name == "zero_free_linear":
        return zero_free_linear_code(bits)
    raise ValueError(f"unknown code table {name!r}; allowed: {', '.join(CODE_NAMES)}")


_DEVICE_CACHE: dict[tuple[str, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def get_code(name: str, device: torch.device | str = "cpu", bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(table, midpoints)`` of a code on ``device`` (cached per device)."""
    device = torch.device(device)
    key = (name, bits, device)
    if key not in _DEVICE_CACHE:
        refuse_in_capture(device, f"the {name!r} code copied from host memory")
        table = _code_cpu(name, bits).to(device)
        _DEVICE_CACHE[key] = (table, (table[1:] + table[:-1]) / 2)
    return _DEVICE_CACHE[key]


# --------------------------------------------------------------------------------------------
# Nibble packing
# --------------------------------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in [0, 15] along the last dim, two per byte (even element low).

    A row of odd length is padded with one zero code, so the packed last dim is ``ceil(n / 2)``.
    """
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`; returns int64 codes with last dim ``length``."""
    low = packed & 0x0F
    high = packed >> 4
    out = torch.stack((low, high), dim=-1).flatten(-2)
    return out[..., :length].long()


# --------------------------------------------------------------------------------------------
# Block-wise absmax quantization along the last dimension
# --------------------------------------------------------------------------------------------


def _num_blocks(length: int, block_size: int) -> int:
    return math.ceil(length / block_size)


def block_size_of(length: int, num_blocks: int) -> int:
    """The power-of-two block size that cut ``length`` entries into ``num_blocks`` blocks, read back from a stored
    state's number of scales (a single block decodes alike under any size of at least ``length``)."""
    per_block = -(-length // num_blocks)
    return 1 << (per_block - 1).bit_length()


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """View ``(..., n)`` as ``(..., nb, block_size)``, zero-padding the last block."""
    n = x.shape[-1]
    nb = _num_blocks(n, block_size)
    pad = nb * block_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], nb, block_size)


#: dtype of the bf16 block scales (:func:`quantize_blockwise`: the eigen and naive forms; the other scales take one
#: byte, :mod:`hf_q4shampoo.log_scales`) and of v's rank-1 maxima
SCALE_DTYPE = torch.bfloat16


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32, finite, non-negative) rounded to the nearest bf16 value (ties to even), still as fp32.
    Integer arithmetic on the bit pattern: the same bits as ``x.to(torch.bfloat16)``, which the Triton AdamW's
    rank-1 maxima go through."""
    bits = x.view(torch.int32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) & -65536).view(torch.float32)


def encode_blockwise(x: torch.Tensor, code: str = "linear2", block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code indices (unpacked, int32) and per-block absmax of ``x`` along its last dim.

    Returns ``(indices, absmax)`` with shapes ``x.shape`` and ``(..., ceil(n / block_size))``; ``absmax`` is fp32
    holding bf16 values (module docstring). An all-zero block gets absmax 0 and decodes to exact zeros.
    """
    blocks = _blocked(x.float(), block_size)
    absmax = bf16_round(blocks.abs().amax(dim=-1))
    return _codes_against(blocks, absmax, code, x.shape), absmax


def _codes_against(blocks: torch.Tensor, scale: torch.Tensor, code: str, shape: torch.Size) -> torch.Tensor:
    """Nearest-code indices of ``blocks`` (``(..., nb, block_size)``) divided by their stored ``scale``, cut back
    to ``shape`` (a zero scale leaves its all-zero block at the code of 0)."""
    _, mids = get_code(code, blocks.device)
    normed = blocks / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    idx = torch.bucketize(normed, mids, out_int32=True)
    return idx.reshape(*shape[:-1], -1)[..., : shape[-1]]


def decode_blockwise(
    idx: torch.Tensor, absmax: torch.Tensor, code: str = "linear2", block_size: int = 64
) -> torch.Tensor:
    """Inverse of :func:`encode_blockwise` (fp32)."""
    return _decode_with_table(idx, absmax, get_code(code, idx.device)[0], block_size)


def _decode_with_table(idx: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block_size: int) -> torch.Tensor:
    """``table[idx]`` times each entry's block scale; the table is passed in so compiled callers
    (:func:`decode_symmetric`) need no cache lookup."""
    n = idx.shape[-1]
    return table[idx.long()] * absmax.repeat_interleave(block_size, dim=-1)[..., :n]


def roundtrip_blockwise(x: torch.Tensor, code: str = "linear2", block_size: int = 64) -> torch.Tensor:
    """``D(Q(x))``: what block-wise quantization of ``x`` gives back (used for error feedback)."""
    idx, absmax = encode_blockwise(x, code, block_size)
    return decode_blockwise(idx, absmax, code, block_size)


def encode_log_blockwise(
    x: torch.Tensor, code: str = "linear2", block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`encode_blockwise` with the block absmax on the log grid of :mod:`~hf_q4shampoo.log_scales`:
    returns ``(indices, grid index j)`` (int32 each); the codes are made with the grid scale ``g(j)`` itself
    (whether or not the stored byte later flushes the block to zero)."""
    blocks = _blocked(x.float(), block_size)
    j = log_scales.grid_index(blocks.abs().amax(dim=-1))
    return _codes_against(blocks, log_scales.grid_value(j), code, x.shape), j


def roundtrip_log_blockwise(x: torch.Tensor, code: str = "linear2", block_size: int = 64) -> torch.Tensor:
    """``D(Q(x))`` with log-grid block scales, before any flush (what the factor's refinement and error
    feedback subtract, here and in the Triton kernels)."""
    idx, j = encode_log_blockwise(x, code, block_size)
    return decode_blockwise(idx, log_scales.grid_value(j), code, block_size)


def quantize_blockwise(
    x: torch.Tensor, code: str = "linear2", block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to packed 4-bit codes (uint8, ``(..., ceil(n/2))``) and bf16 block scales."""
    idx, absmax = encode_blockwise(x, code, block_size)
    return pack_nibbles(idx), absmax.to(SCALE_DTYPE)


def dequantize_blockwise(
    packed: torch.Tensor, absmax: torch.Tensor, length: int, code: str = "linear2", block_size: int = 64
) -> torch.Tensor:
    """Dequantize the output of :func:`quantize_blockwise`; ``length`` is the original last dim."""
    return decode_blockwise(unpack_nibbles(packed, length), absmax, code, block_size)


# --------------------------------------------------------------------------------------------
# Square matrices with an exact (fp32) diagonal — paper 2's "DiagReal" scheme
# --------------------------------------------------------------------------------------------


def quantize_diagreal(x: torch.Tensor, code: str = "linear2", block_size: int = 64) -> dict[str, torch.Tensor]:
    """Quantize the off-diagonal of square matrices ``(..., n, n)``; keep the diagonal in fp32.

    The diagonal is removed *before* block maxima are taken, so it neither inflates the scales nor
    is reconstructed from codes (its 4-bit slot decodes to zero and is overwritten).
    """
    x = x.float()
    diag = x.diagonal(dim1=-2, dim2=-1).clone()
    off = x - torch.diag_embed(diag)
    codes, scales = quantize_blockwise(off, code, block_size)
    return {"codes": codes, "scales": scales, "diag": diag}


def dequantize_diagreal(q: dict[str, torch.Tensor], code: str = "linear2", block_size: int = 64) -> torch.Tensor:
    n = q["diag"].shape[-1]
    off = dequantize_blockwise(q["codes"], q["scales"], n, code, block_size)
    return off + torch.diag_embed(q["diag"])  # diagonal slots of ``off`` decode to exactly 0


# --------------------------------------------------------------------------------------------
# Symmetric matrices: packed strict lower triangle + fp32 diagonal
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _symmetric_layout_cpu(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index maps of the packed layout of an n x n symmetric matrix's strict lower triangle.

    Row i of the strict lower triangle has i entries; row i is paired with row n - i so each packed
    row holds exactly n entries (the single middle row of an even n is zero-padded): n // 2 packed
    rows of width n. Returns ``(source, valid, gather)``: ``source`` / ``valid`` (P*n,) say which flat
    index of the full matrix each packed slot holds; ``gather`` (n*n,) says, for each entry of the
    full matrix, its slot in ``cat(packed values, diagonal)``.
    """
    rows, width = n // 2, n
    r = torch.arange(rows).unsqueeze(1)  # packed row
    k = torch.arange(width).unsqueeze(0)  # position in the packed row
    a, b = r + 1, n - 1 - r  # the two triangle rows sharing packed row r (a + b = n)
    first = k < a
    row = torch.where(first, a, b).expand(rows, width)
    col = torch.where(first, k, k - a).expand(rows, width)
    valid = (first | (a != b)).flatten()
    row, col = row.flatten(), col.flatten()
    source = torch.where(valid, row * n + col, torch.zeros_like(row))
    slots = torch.arange(rows * width)[valid]
    gather = torch.empty(n * n, dtype=torch.int64)
    gather[(row * n + col)[valid]] = slots
    gather[(col * n + row)[valid]] = slots
    diag = torch.arange(n)
    gather[diag * n + diag] = rows * width + diag
    return source, valid, gather


_LAYOUT_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _symmetric_layout(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (n, torch.device(device))
    if key not in _LAYOUT_CACHE:
        _LAYOUT_CACHE[key] = tuple(t.to(device) for t in _symmetric_layout_cpu(n))
    return _LAYOUT_CACHE[key]


def _log_store(idx: torch.Tensor, j: torch.Tensor, exponent_dims: int = 2) -> dict[str, torch.Tensor]:
    """Packed codes, stored scale bytes and the exponent of a log-grid encoding (one per ``exponent_dims``
    trailing dimensions of the scales: a matrix's rows and blocks, or a flattened tensor's blocks)."""
    exponent = log_scales.matrix_exponent(j, exponent_dims)
    return {"codes": pack_nibbles(idx), "scales": log_scales.encode_scales(j, exponent), "scale_exp": exponent}


def quantize_log_blockwise(
    x: torch.Tensor, code: str = "linear2", block_size: int = 64, exponent_dims: int = 2
) -> dict[str, torch.Tensor]:
    """Packed 4-bit codes of ``x`` along its last dim with one-byte log-grid block scales (``codes``, ``scales``,
    ``scale_exp``: one exponent per ``exponent_dims`` trailing dims of the scales, e.g. 1 for ``(K, numel)``
    flattened tensors, 2 for ``(..., rows, n)`` matrices)."""
    return _log_store(*encode_log_blockwise(x, code, block_size), exponent_dims)


def dequantize_log_blockwise(
    q: dict[str, torch.Tensor], length: int, code: str = "linear2", block_size: int = 64
) -> torch.Tensor:
    """Inverse of :func:`quantize_log_blockwise` (fp32); ``length`` is the original last dim."""
    return _decode_log(
        q["codes"], q["scales"], q["scale_exp"], get_code(code, q["codes"].device)[0], block_size, length
    )


def quantize_symmetric(
    x: torch.Tensor, code: str = "linear2", block_size: int = 64, refine: bool = False
) -> dict[str, torch.Tensor]:
    """4-bit storage of symmetric matrices ``(..., n, n)``: half the codes of :func:`quantize_diagreal`.

    Only the strict lower triangle is quantized, packed two rows per line (see
    ``_symmetric_layout_cpu``) in blocks of ``block_size`` along the packed rows; the diagonal is kept
    in fp16 divided by its largest entry (``diag``, ``diag_scale``: :func:`normalised_diagonal`); block
    scales are one byte on the log grid (``scales``, ``scale_exp``: module docstring). Decoding
    mirrors the triangle, so the result is exactly symmetric. (The same idea as
    Distributed Shampoo's lossless symmetric packing, applied to 4-bit codes.) With ``refine``, a second 4-bit
    code of what the stored first one leaves (``res_codes`` / ``res_scales`` / ``res_scale_exp``, same layout)
    is stored too, and decoding adds it: about 8-bit entries at twice the codes (``root_bits=8``).
    """
    n = x.shape[-1]
    diag = normalised_diagonal(x.diagonal(dim1=-2, dim2=-1))
    if n < 2:
        codes = x.new_zeros((*x.shape[:-2], 0, 0), dtype=torch.uint8)
        exponent = torch.full(x.shape[:-2], log_scales.ZERO_INDEX, dtype=torch.int32, device=x.device)
        out = {"codes": codes, "scales": codes.clone(), "scale_exp": exponent, **diag}
        if refine:
            out.update(res_codes=codes.clone(), res_scales=codes.clone(), res_scale_exp=exponent.clone())
        return out
    source, valid, _ = _symmetric_layout(n, x.device)
    flat = x.float().flatten(-2)
    packed = torch.where(valid, flat[..., source], torch.zeros((), device=x.device)).reshape(*x.shape[:-2], n // 2, n)
    out = {**_log_store(*encode_log_blockwise(packed, code, block_size)), **diag}
    if refine:
        table = get_code(code, x.device)[0]
        residual = packed - _decode_log(out["codes"], out["scales"], out["scale_exp"], table, block_size, n)
        res = _log_store(*encode_log_blockwise(residual, code, block_size))
        out.update({f"res_{key}": value for key, value in res.items()})
    return out


def normalised_diagonal(diag: torch.Tensor) -> dict[str, torch.Tensor]:
    """A diagonal ``(..., n)`` as fp16 values in [-1, 1] (``diag``) times one fp32 scale per matrix, its largest
    absolute entry (``diag_scale``): 2 bytes an entry, 11 significant bits. bf16 (8 bits) cost 8-14% on the
    ill-conditioned least squares of docs/results.md §4.9, where an inverse root's off-diagonal entries are small
    beside its diagonal and its diagonal's rounding is the larger error; fp16 alone would overflow or lose
    precision at the scales roots take."""
    diag = diag.float()
    top = diag.abs().amax(-1) if diag.shape[-1] else diag.new_zeros(diag.shape[:-1])
    scale = torch.where(top > 0, top, torch.ones_like(top))
    return {"diag": (diag / scale.unsqueeze(-1)).to(torch.float16), "diag_scale": scale}


def stored_diagonal(diag: torch.Tensor, diag_scale: torch.Tensor) -> torch.Tensor:
    """fp32 diagonal of :func:`normalised_diagonal`'s storage."""
    return diag.float() * diag_scale.unsqueeze(-1)


def _decode_log(
    codes: torch.Tensor,
    scales: torch.Tensor,
    exponent: torch.Tensor,
    table: torch.Tensor,
    block_size: int,
    n: int,
    fractions: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 ``(..., rows, n)`` of packed codes with log-grid scale bytes."""
    return _decode_with_table(
        unpack_nibbles(codes, n), log_scales.decode_scales(scales, exponent, fractions), table, block_size
    )


def decode_symmetric(
    codes: torch.Tensor,
    scales: torch.Tensor,
    scale_exp: torch.Tensor,
    diag: torch.Tensor,
    diag_scale: torch.Tensor,
    table: torch.Tensor,
    fractions: torch.Tensor,
    gather: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
    res_codes: torch.Tensor | None = None,
    res_scales: torch.Tensor | None = None,
    res_scale_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The arithmetic of :func:`dequantize_symmetric`, with its lookup tables passed in (compilable). The second
    code (``res_*``, if stored) is added to the first in fp32, before the cast and the mirroring."""
    n = diag.shape[-1]
    packed = _decode_log(codes, scales, scale_exp, table, block_size, n, fractions)
    if res_codes is not None:
        packed = packed + _decode_log(res_codes, res_scales, res_scale_exp, table, block_size, n, fractions)
    flat = torch.cat([packed.flatten(-2), stored_diagonal(diag, diag_scale)], dim=-1)
    return flat[..., gather].unflatten(-1, (n, n)).to(dtype)


def symmetric_decode_tables(n: int, code: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(code table, scale-grid fractions, gather index)`` that :func:`decode_symmetric` needs for order ``n``."""
    return get_code(code, device)[0], log_scales.fraction_table(device), _symmetric_layout(n, device)[2]


#: the keys of :func:`quantize_symmetric`'s first code and diagonal, in :func:`decode_symmetric`'s argument order
SYMMETRIC_KEYS = ("codes", "scales", "scale_exp", "diag", "diag_scale")

#: the keys of :func:`quantize_symmetric`'s second code, in :func:`decode_symmetric`'s argument order
RESIDUAL_KEYS = ("res_codes", "res_scales", "res_scale_exp")


def dequantize_symmetric(
    q: dict[str, torch.Tensor], code: str = "linear2", block_size: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    n = q["diag"].shape[-1]
    if n < 2:
        return torch.diag_embed(stored_diagonal(q["diag"], q["diag_scale"])).to(dtype)
    table, fractions, gather = symmetric_decode_tables(n, code, q["diag"].device)
    residual = [q[key] for key in RESIDUAL_KEYS] if "res_codes" in q else []
    stored = [q[key] for key in SYMMETRIC_KEYS]
    return decode_symmetric(*stored, table, fractions, gather, block_size, dtype, *residual)


# --------------------------------------------------------------------------------------------
# Two triangular matrices in one code buffer (Cholesky factor + error feedback, paper 1)
# --------------------------------------------------------------------------------------------


def _diag_block_masks(n: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row r and block j: (j < block of r's diagonal, j == block of r's diagonal)."""
    nb = _num_blocks(n, block_size)
    diag_block = (torch.arange(n, device=device) // block_size).unsqueeze(-1)
    j = torch.arange(nb, device=device).unsqueeze(0)
    return j < diag_block, j == diag_block


def quantize_lower_upper(
    lower: torch.Tensor, upper: torch.Tensor, code: str = "linear2", block_size: int = 64
) -> dict[str, torch.Tensor]:
    """Store a strictly-lower and a strictly-upper matrix in **one** n x n 4-bit code buffer.

    ``lower`` (e.g. a Cholesky factor's off-diagonal) fills the strictly-lower triangle and
    ``upper`` (e.g. the transposed error-feedback state) the strictly-upper one. The two triangles
    are normalised with **separate** block scales (decision D2 of papers.md §2.8: the error state is
    much smaller than the factor, and a shared absmax would round it to zero). Blocks are 64
    entries of a row; blocks left of the diagonal belong to ``lower``, blocks right of it to
    ``upper``, and only the one block per row that straddles the diagonal needs both scales, so the
    layout is: ``scales`` (n x nb: lower's scale for blocks up to the diagonal block, upper's after
    it) plus ``diag_block_upper_scale`` (n,) for upper's part of the straddling block. Every scale is one
    byte of the log grid, relative to one exponent per matrix (``scale_exp``, the largest grid index of both
    triangles; module docstring). Memory is that of one quantized matrix plus n bytes.
    """
    n = lower.shape[-1]
    lo_idx, lo_j = encode_log_blockwise(torch.tril(lower.float(), -1), code, block_size)
    up_idx, up_j = encode_log_blockwise(torch.triu(upper.float(), 1), code, block_size)
    row = torch.arange(n, device=lower.device).unsqueeze(-1)
    col = torch.arange(n, device=lower.device).unsqueeze(0)
    idx = torch.where(col < row, lo_idx, up_idx)
    left, at = _diag_block_masks(n, block_size, lower.device)
    j = torch.where(left | at, lo_j, up_j)
    diag_j = torch.where(at, up_j, torch.full_like(up_j, log_scales.ZERO_INDEX)).amax(-1)  # one per row
    exponent = torch.maximum(log_scales.matrix_exponent(j), log_scales.matrix_exponent(diag_j, dims=1))
    return {
        "codes": pack_nibbles(idx),
        "scales": log_scales.encode_scales(j, exponent),
        "diag_block_upper_scale": log_scales.encode_scales(diag_j, exponent),
        "scale_exp": exponent,
    }


def dequantize_lower_upper(
    q: dict[str, torch.Tensor], n: int, code: str = "linear2", block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`quantize_lower_upper`: returns ``(strict lower, strict upper)`` in fp32."""
    idx = unpack_nibbles(q["codes"], n)
    left, at = _diag_block_masks(n, block_size, idx.device)
    scales = log_scales.decode_scales(q["scales"], q["scale_exp"])
    diag_upper = log_scales.decode_scales(q["diag_block_upper_scale"], q["scale_exp"])
    lo_scale = torch.where(left | at, scales, torch.zeros_like(scales))
    up_scale = torch.where(left | at, torch.zeros_like(scales), scales) + at * diag_upper.unsqueeze(-1)
    lower = torch.tril(decode_blockwise(idx, lo_scale, code, block_size), -1)
    upper = torch.triu(decode_blockwise(idx, up_scale, code, block_size), 1)
    return lower, upper


# --------------------------------------------------------------------------------------------
# Rank-1 normalisation for non-negative tensors (paper 3, second moment)
# --------------------------------------------------------------------------------------------


def _rank1_scale(maxima: list[torch.Tensor], shape: tuple[int, ...], batch_dims: int) -> torch.Tensor:
    """``min`` over the per-dimension maxima, broadcast to ``shape`` (leading ``batch_dims`` kept)."""
    scale = None
    for dim, m in enumerate(maxima):
        view = list(shape[:batch_dims]) + [1] * (len(shape) - batch_dims)
        view[batch_dims + dim] = shape[batch_dims + dim]
        m = m.reshape(view)
        scale = m if scale is None else torch.minimum(scale, m)
    assert scale is not None
    return scale


def quantize_rank1(x: torch.Tensor, code: str = "zero_free_linear", batch_dims: int = 0) -> dict[str, torch.Tensor]:
    """Rank-1 normalised 4-bit quantization of a non-negative tensor (paper 3's second moment).

    Every (non-batch) dimension d keeps the maxima over all other dimensions; an entry is normalised
    by the smallest of its maxima (``min(r_i, c_j)`` for a matrix), so it lies in [0, 1]. Returns
    ``codes`` (``(*batch, ceil(numel / 2))``, packed) and ``max0, max1, ...`` (bf16, ``(*batch, size_d)``).
    The first ``batch_dims`` dimensions index independent tensors quantized in one go.
    """
    if x.ndim - batch_dims < 2:
        raise ValueError("rank-1 normalisation needs a tensor with at least 2 dims; use block-wise for 1-D")
    x = x.float()
    dims = range(batch_dims, x.ndim)
    # each maximum rounded to bf16 before the entries are divided by it (as the block scales: the stored
    # normaliser is the one the codes were made with; an entry up to 2^-8 above it takes the end code)
    maxima = [bf16_round(x.amax(dim=tuple(d for d in dims if d != dim))) for dim in dims]
    scale = _rank1_scale(maxima, tuple(x.shape), batch_dims)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    _, mids = get_code(code, x.device)
    idx = torch.bucketize(x / safe, mids, out_int32=True)
    batch = tuple(x.shape[:batch_dims])
    out = {"codes": pack_nibbles(idx.reshape(*batch, -1) if batch else idx.reshape(1, -1))}
    for i, m in enumerate(maxima):
        out[f"max{i}"] = m.to(SCALE_DTYPE)
    return out


def dequantize_rank1(
    q: dict[str, torch.Tensor], shape: tuple[int, ...], code: str = "zero_free_linear", batch_dims: int = 0
) -> torch.Tensor:
    """Inverse of :func:`quantize_rank1`; ``shape`` includes the batch dimensions."""
    numel = math.prod(shape[batch_dims:])
    table, _ = get_code(code, q["codes"].device)
    values = table[unpack_nibbles(q["codes"], numel)].reshape(shape)
    maxima = [q[f"max{d}"].float() for d in range(len(shape) - batch_dims)]
    return values * _rank1_scale(maxima, tuple(shape), batch_dims)
