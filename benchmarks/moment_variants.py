"""Which part of the 4-bit first-order state costs loss on the hard-conditioning family (issue 14, item 2).

The fp32 preconditioner (``precond="fp32"``) with the family's schedule, each first-order variant at its best of
``--lrs``. Variants that are not options are made by replacing the codecs of ``hf_q4shampoo.moments`` in this
process (the steps of ``first_order`` call them through that module): m or v kept in fp32, m in blocks of 32, v
block-wise (128) instead of rank-1, v stored as its square root, stochastic rounding of m. Numbers in
docs/results.md §4.

    python benchmarks/moment_variants.py --problems ls_k1e6_256x128,ls_k1e4_128x128
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hard_conditioning as hc  # noqa: E402

import hf_q4shampoo.moments as fm  # noqa: E402
from hf_q4shampoo.quant import dequantize_blockwise, get_code, pack_nibbles, quantize_blockwise  # noqa: E402

ORIGINAL = (fm.encode_signed, fm.decode_signed, fm.encode_nonneg, fm.decode_nonneg)
GEN = torch.Generator().manual_seed(0)


def _stochastic(x: torch.Tensor, code: str, block: int):
    table, _ = get_code(code)
    n = x.shape[-1]
    blocks = torch.nn.functional.pad(x, (0, (-n) % block)).reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1)
    v = (blocks / torch.where(amax > 0, amax, torch.ones_like(amax)).unsqueeze(-1)).clamp(float(table[0]), 1.0)
    hi = torch.bucketize(v, table).clamp(1, len(table) - 1)
    p = ((v - table[hi - 1]) / (table[hi] - table[hi - 1])).clamp(0, 1)
    idx = torch.where(torch.rand(v.shape, generator=GEN) < p, hi, hi - 1)
    return pack_nibbles(idx.reshape(*x.shape[:-1], -1)[..., :n]), amax


def _blockwise(code: str, block: int, stochastic: bool = False):
    def encode(x, quantized, *_):
        if not quantized:
            return {"": x}
        flat = x.reshape(x.shape[0], -1)
        codes, scales = _stochastic(flat, code, block) if stochastic else quantize_blockwise(flat, code, block)
        return {"_codes": codes, "_scales": scales}

    def decode(m, shape, *_):
        if "" in m:
            return m[""]
        return dequantize_blockwise(m["_codes"], m["_scales"], math.prod(shape[1:]), code, block).reshape(shape)

    return encode, decode


def _set_m(pair):
    fm.encode_signed, fm.decode_signed = pair


def _set_v(pair):
    fm.encode_nonneg, fm.decode_nonneg = pair


def _restore():
    _set_m(ORIGINAL[:2])
    _set_v(ORIGINAL[2:])


def _sqrt_v():
    enc, dec = ORIGINAL[2], ORIGINAL[3]
    _set_v((lambda x, q: enc(x.sqrt(), q), lambda m, shape: m[""] if "" in m else dec(m, shape) ** 2))


VARIANTS = {  # name -> (patch or None, first_order_bits, options)
    "fp32 moments": (None, 32, {}),
    "4-bit (paper 3: m dynamic B128, v rank-1)": (None, 4, {"first_order_m_map": "dynamic"}),
    "m fp32, v 4-bit": (lambda: _set_m((lambda x, q, *_: {"": x}, ORIGINAL[1])), 4, {}),
    "m 4-bit, v fp32": (lambda: _set_v((lambda x, q: {"": x}, ORIGINAL[3])), 4, {"first_order_m_map": "dynamic"}),
    "m blocks of 32": (lambda: _set_m(_blockwise("dynamic", 32)), 4, {}),
    "v block-wise 128 (no rank-1)": (
        lambda: _set_v(_blockwise("zero_free_linear", 128)),
        4,
        {"first_order_m_map": "dynamic"},
    ),
    "v stored as sqrt(v)": (_sqrt_v, 4, {"first_order_m_map": "dynamic"}),
    "m stochastic rounding": (lambda: _set_m(_blockwise("dynamic", 128, stochastic=True)), 4, {}),
    "m Linear-2 (first_order_m_map=linear2)": (None, 4, {"first_order_m_map": "linear2"}),
    "m Linear-2, stochastic rounding": (lambda: _set_m(_blockwise("linear2", 128, stochastic=True)), 4, {}),
    "m dynamic, v factored": (None, 4, {"first_order_m_map": "dynamic", "first_order_v": "factored"}),
    "m Linear-2, v factored": (None, 4, {"first_order_m_map": "linear2", "first_order_v": "factored"}),
    "fp32 m, v factored": (None, 32, {"first_order_v": "factored"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="ls_k1e6_256x128,ls_k1e4_128x128")
    ap.add_argument("--lrs", default="0.1,0.2,0.4,0.8")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lrs = [float(v) for v in args.lrs.split(",")]
    for pname in args.problems.split(","):
        problem = hc.Problem(pname)
        ref = None
        for name, (patch, bits, options) in VARIANTS.items():
            _restore()
            if patch is not None:
                patch()
            spec = dict(precond="fp32", first_order_bits=bits, update_freq=1, root_freq=10, **options)
            best = min(hc.run(problem, spec, lr) for lr in lrs)
            ref = ref or best
            print(f"| {pname} | {name} | {best:.4g} | {best / ref:.2f}x |", flush=True)
    _restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
