"""The Triton kernels run in Triton's interpreter on the CPU and must match their torch oracles.

Skipped where Triton is not installed (CPU builds of torch do not ship it; ``pip install triton`` adds
it). The CUDA-compiled kernels are checked against the same oracles in ``test_cuda.py``. The interpreter
rounds fp32 -> bf16 differently from the GPU, so only fp32 parameters are compared here.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")

SCRIPT = textwrap.dedent('''
    import math
    import torch
    from hf_q4shampoo import first_order as fo, quant, triton_kernels as tk

    assert tk.HAS_TRITON
    g = torch.Generator().manual_seed(0)
    # root decoder: bit-identical to quant.decode_symmetric, even and odd orders
    for n in (64, 65, 130):
        x = torch.randn(3, n, n, generator=g)
        q = quant.quantize_symmetric(x + x.mT)
        table, gather = quant.symmetric_decode_tables(n, "linear2", torch.device("cpu"))
        ref = quant.decode_symmetric(q["codes"], q["scales"], q["diag"], table, gather, 64, torch.float32)
        assert torch.equal(ref, tk.decode_symmetric(q["codes"], q["scales"], q["diag"], table, 64, torch.float32))

    # 4-bit AdamW: the same codes and parameters as the torch math, two steps, 200 columns (partial blocks),
    # for both codes of m
    K, R, C = 3, 40, 200
    for m_map in ("dynamic", "linear2"):
        params = [torch.randn(R, C, generator=g) for _ in range(K)]
        states = [fo.init_first_order_state(p, "adamw", 4, m_map=m_map) for p in params]
        moments = {k: torch.stack([s[k] for s in states]) for k in fo.first_order_keys(states[0])}
        kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, bits=4, m_map=m_map)
        fo.adamw_batch_step(params, torch.randn(K, R, C, generator=g), moments, step=1, **kw)
        fast_p, fast_m = [p.clone() for p in params], {k: v.clone() for k, v in moments.items()}
        d = torch.randn(K, R, C, generator=g) * torch.linspace(0.1, 3, C)
        fo.adamw_batch_step(params, d, moments, step=2, **kw)
        scalar = lambda v: torch.tensor(v, dtype=torch.float32)
        tk.adamw4_step(fast_p, d, fast_m, scalar(1e-2), scalar(1 - 0.9**2), scalar(math.sqrt(1 - 0.999**2)),
                       0.9, 0.999, 1e-8, 0.1, m_map)
        for key, ref in moments.items():
            got = fast_m[key]
            if ref.dtype == torch.uint8:
                assert float((ref != got).float().mean()) < 1e-3, (m_map, key)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
        for p, q in zip(params, fast_p):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)

    # a skipped member (keep = False, e.g. a NaN gradient) keeps its parameter and moments exactly; the
    # others match the torch math with the same flags
    keep = torch.tensor([True, False, True])
    d = torch.randn(K, R, C, generator=g)
    d[1, 3, 5] = float("nan")
    before_p, before_m = [p.clone() for p in fast_p], {k: v.clone() for k, v in fast_m.items()}
    ref_p, ref_m = params[1].clone(), {k: v[1].clone() for k, v in moments.items()}
    fo.adamw_batch_step(params, d, moments, step=3, keep=keep, **kw)
    tk.adamw4_step(fast_p, d, fast_m, scalar(1e-2), scalar(1 - 0.9**3), scalar(math.sqrt(1 - 0.999**3)),
                   0.9, 0.999, 1e-8, 0.1, m_map, keep=keep)
    assert torch.equal(fast_p[1], before_p[1]) and torch.equal(params[1], ref_p)
    for key in fast_m:
        assert torch.equal(fast_m[key][1], before_m[key][1]), key
        assert torch.equal(moments[key][1], ref_m[key]), key
    for i in (0, 2):
        torch.testing.assert_close(fast_p[i], params[i], rtol=1e-5, atol=1e-6)
        assert not torch.equal(fast_p[i], before_p[i])
    # the Cholesky form's storage: dequantization, and re-quantization with error feedback, bit-identical
    table, mids = quant.get_code("linear2", torch.device("cpu"))
    for n in (64, 100, 130):  # one block, a partial block, an odd order
        lower = torch.tril(torch.randn(2, n, n, generator=g), -1)
        upper = torch.triu(torch.randn(2, n, n, generator=g) * 1e-2, 1)
        q = quant.quantize_lower_upper(lower, upper)
        diag = torch.rand(2, n, generator=g) + 0.5
        lo, up = quant.dequantize_lower_upper(q, n)
        c, u = tk.dequantize_factor(q["codes"], q["scales"], q["diag_block_upper_scale"], diag, table, 64)
        assert torch.equal(c, lo + torch.diag_embed(diag)) and torch.equal(u, up)
        new_c = torch.tril(torch.randn(2, n, n, generator=g))
        for beta in (0.0, 0.3):
            x = new_c + up.mT
            residual = torch.tril(x, -1) - quant.roundtrip_blockwise(torch.tril(x, -1))
            ref = quant.quantize_lower_upper(torch.tril(x, -1), (beta * up.mT + (1 - beta) * residual).mT)
            got = tk.requantize_with_feedback(new_c, up, table, mids, 64, beta)
            assert torch.equal(ref["codes"], got["codes"]) and torch.equal(ref["scales"], got["scales"])
            assert torch.equal(ref["diag_block_upper_scale"], got["diag_block_upper_scale"])
            assert torch.equal(x.diagonal(dim1=-2, dim2=-1), got["diag"])
    print("ok")
''')


def test_kernels_match_their_torch_oracles_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
