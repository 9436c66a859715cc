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

SCRIPT = textwrap.dedent("""
    import math
    import torch
    from hf_q4shampoo import first_order as fo, moments as fm, quant, triton_kernels as tk

    assert tk.HAS_TRITON
    g = torch.Generator().manual_seed(0)
    # root decoder: bit-identical to quant.decode_symmetric, even and odd orders
    for n in (64, 65, 130):
        x = torch.randn(3, n, n, generator=g)
        # entries over 30 octaves: some blocks lie more than 16 octaves below the largest and are stored as zero
        s = 2.0 ** torch.randint(-30, 1, (3, n, 1), generator=g)
        x = s * x * s.mT
        q = quant.quantize_symmetric(x + x.mT)
        assert bool((q["scales"] == 0).any()) and bool((q["scales"] == 255).flatten(1).any(1).all())
        table, fractions, gather = quant.symmetric_decode_tables(n, "linear2", torch.device("cpu"))
        stored = [q[key] for key in quant.SYMMETRIC_KEYS]
        ref = quant.decode_symmetric(*stored, table, fractions, gather, 64, torch.float32)
        assert torch.equal(ref, tk.decode_symmetric(*stored, table, fractions, 64, torch.float32))
        # root_bits=8: the residual's second code added in the same launch, as the torch decoding adds it
        q = quant.quantize_symmetric(x + x.mT, refine=True)
        stored = [q[key] for key in quant.SYMMETRIC_KEYS]
        residual = [q[key] for key in quant.RESIDUAL_KEYS]
        ref = quant.decode_symmetric(*stored, table, fractions, gather, 64, torch.float32, *residual)
        got = tk.decode_symmetric(*stored, table, fractions, 64, torch.float32, *residual)
        first_code_only = quant.dequantize_symmetric({k: q[k] for k in quant.SYMMETRIC_KEYS})
        assert torch.equal(ref, got) and not torch.equal(ref, first_code_only)

    # gathering tensors by address: torch.stack(...).float(), fp32 and bf16 sources, a partial last block
    from hf_q4shampoo import triton_gather
    for dtype in (torch.float32, torch.bfloat16):
        src = [torch.randn(37, 61, generator=g).to(dtype) for _ in range(3)]
        table = torch.tensor([t.data_ptr() for t in src], dtype=torch.int64)
        got = triton_gather.stack_by_address(table, (37, 61), dtype)
        assert torch.equal(got, torch.stack(src).float()), dtype
        # what the graphs gather and flag by (the update's chunks, the statistics' slots), a NaN in one member
        from hf_q4shampoo.graphed_update import gather_with_amax
        from hf_q4shampoo.layout import StepBatch
        src[1][4, 7] = float("nan")
        stacked, amax = gather_with_amax(table, StepBatch(None, [0, 1, 2], 1, src))
        assert torch.equal(stacked[[0, 2]], torch.stack([src[0], src[2]]).float()), dtype
        assert torch.equal(torch.isfinite(amax), torch.tensor([True, False, True])), dtype
        assert torch.equal(amax[[0, 2]], torch.stack([src[0].float().abs().max(), src[2].float().abs().max()]))

    # 4-bit AdamW: the same codes and parameters as the torch math, two steps, 200 columns (partial blocks),
    # for both codes of m
    K, R, C = 3, 40, 200
    for m_map in ("dynamic", "linear2"):
        params = [torch.randn(R, C, generator=g) for _ in range(K)]
        m_block = 128 if m_map == "dynamic" else 256  # paper 3's block, and Q4Shampoo's default
        states = [fm.init_first_order_state(p, "adamw", 4, m_map=m_map, m_block=m_block) for p in params]
        moments = {k: torch.stack([s[k] for s in states]) for k in fm.first_order_keys(states[0])}
        assert moments["exp_avg_scales"].shape[-1] == -(-R * C // m_block)
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
    # a factored v (paper 3's 4-bit Factor), through adamw_batch_step with its CUDA-only gate opened on the CPU
    # (so the EMAs go through first_order.factored_ema and pass A reads the factors): the row and column EMAs and
    # the parameters as the torch math, with one member skipped (its parameter and moments stay exactly as they were)
    torch_kernel = fo.adamw_kernel
    fo.adamw_kernel = lambda params, moments, compile_: "triton" if compile_ else torch_kernel(params, moments, False)
    launches = []
    adamw4 = tk.adamw4_step
    tk.adamw4_step = lambda *a, **k: (launches.append(k["v_factors"] is not None), adamw4(*a, **k))[1]
    params = [torch.randn(R, C, generator=g) for _ in range(K)]
    states = [fm.init_first_order_state(p, "adamw", 4, v="factored", m_map="linear2") for p in params]
    moments = {k: torch.stack([s[k] for s in states]) for k in fm.first_order_keys(states[0])}
    assert {"exp_avg_sq_row", "exp_avg_sq_col"} <= set(moments) and tk.supports(params, torch.empty(K, R, C), moments)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, bits=4, m_map="linear2")
    fo.adamw_batch_step(params, torch.randn(K, R, C, generator=g), moments, step=1, **kw)
    fast_p, fast_m = [p.clone() for p in params], {k: v.clone() for k, v in moments.items()}
    for step, keep in ((2, None), (3, torch.tensor([True, False, True]))):
        d = torch.randn(K, R, C, generator=g) * torch.linspace(0.1, 3, C)
        if keep is not None:
            d[1, 3, 5] = float("nan")
            before_p, before_m = fast_p[1].clone(), {k: v[1].clone() for k, v in fast_m.items()}
        fo.adamw_batch_step(params, d, moments, step=step, keep=keep, **kw)
        fo.adamw_batch_step(fast_p, d, fast_m, step=step, keep=keep, compile_=True, **kw)
        for key, ref in moments.items():
            if ref.dtype == torch.uint8:
                assert float((ref != fast_m[key]).float().mean()) < 1e-3, key
            else:
                torch.testing.assert_close(fast_m[key], ref, rtol=1e-5, atol=1e-8)
        for i, (p, q) in enumerate(zip(params, fast_p)):
            if keep is not None and i == 1:
                assert torch.equal(q, before_p) and all(torch.equal(fast_m[k][1], before_m[k]) for k in fast_m)
            else:
                torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert launches == [True, True], launches  # both steps ran the kernel, with v's factors
    fo.adamw_kernel, tk.adamw4_step = torch_kernel, adamw4

    # the Cholesky form's storage: dequantization, and re-quantization with error feedback, bit-identical
    table, mids = quant.get_code("linear2", torch.device("cpu"))
    for n in (64, 100, 130):  # one block, a partial block, an odd order
        lower = torch.tril(torch.randn(2, n, n, generator=g), -1)
        upper = torch.triu(torch.randn(2, n, n, generator=g) * 1e-2, 1)
        q = quant.quantize_lower_upper(lower, upper)
        diag = torch.rand(2, n, generator=g) + 0.5
        lo, up = quant.dequantize_lower_upper(q, n)
        stored = (q["codes"], q["scales"], q["diag_block_upper_scale"], q["scale_exp"])
        c, u = tk.dequantize_factor(*stored, diag, table, 64, "feedback")
        assert torch.equal(c, lo + torch.diag_embed(diag)) and torch.equal(u, up)
        # rows over 30 octaves: some blocks are flushed to zero, in both paths alike
        rows = 2.0 ** torch.randint(-30, 1, (2, n, 1), generator=g)
        new_c, err = torch.tril(torch.randn(2, n, n, generator=g)) * rows, up.mT * rows
        for beta in (0.0, 0.3):
            x = new_c + err
            residual = torch.tril(x, -1) - quant.roundtrip_log_blockwise(torch.tril(x, -1))
            ref = quant.quantize_lower_upper(torch.tril(x, -1), (beta * err + (1 - beta) * residual).mT)
            got = tk.requantize_factor(new_c, err.mT, table, mids, 64, "feedback", False, beta)
            for key in ("codes", "scales", "diag_block_upper_scale", "scale_exp"):
                assert torch.equal(ref[key], got[key]), key
            assert torch.equal(x.diagonal(dim1=-2, dim2=-1), got["diag"])
        lo, _ = quant.dequantize_lower_upper(got, n)
        flushed = (lo == 0).all(-1) & (torch.tril(x, -1) != 0).any(-1)  # rows > 16 octaves below the largest
        assert bool(flushed.any()) and bool((got["scales"] == 255).flatten(1).any(1).all())

    # every factor layout through the form itself: the eager torch code (the oracle) and the kernels (the
    # form's CUDA-only gate opened on the CPU) give bit-identical states after two updates (the first loads
    # chol(eps I), the second a full factor) and the same statistics. Order 45 with blocks of 16: an odd
    # order, a partial last block and diagonal blocks that straddle row tiles; one case at the default 64
    # with the other code.
    from hf_q4shampoo.preconditioners import FormSettings, make_form

    calls = []
    def counted(name, f):
        return lambda *a, **k: (calls.append(name), f(*a, **k))[1]

    for name in ("dequantize_factor", "requantize_factor"):  # count the kernel calls: the gate must be open
        setattr(tk, name, counted(name, getattr(tk, name)))
    layouts = [(p, u, s) for p, u in (("cholesky", "feedback"), ("cholesky_ef", "feedback"), ("cholesky_ef", "refine"))
               for s in ("row", "column")]
    cases = [(45, 16, "linear2", *layout) for layout in layouts]
    cases.append((100, 64, "dynamic", "cholesky_ef", "refine", "column"))
    for n, block, code, precond, upper, scaling in cases:
        x = torch.randn(2, 2, n, 2 * n, generator=g) * torch.linspace(0.05, 3, 2 * n)
        grams = x @ x.mT
        results = []
        for fused in (False, True):
            form = make_form(precond, FormSettings.from_options(
                min_quant_numel=1024, quant_block_size=block, quant_map=code, factor_upper=upper,
                factor_scaling=scaling, ef_beta=0.3, fused_statistics=fused))
            if fused:
                form._fused = lambda device: True
            calls.clear()
            state = form.init_state(n, 2, torch.device("cpu"))
            for gram in grams:
                form.update_statistics(state, gram)
            results.append((state, form.statistics(state)))
            assert len(calls) == (5 if fused else 0), calls
        (ref, ref_stats), (got, got_stats) = results
        case = (n, precond, upper, scaling)
        assert ref.keys() == got.keys(), case
        for key in ref:
            assert torch.equal(ref[key], got[key]), (case, key)
        assert torch.equal(ref_stats, got_stats), case
        assert float(ref["factor_diag_block_upper_scale"].abs().max()) > 0 or precond == "cholesky", case
    print("ok")
""")


def test_kernels_match_their_torch_oracles_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


COMPILE_SCRIPT = textwrap.dedent("""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hf_q4shampoo import triton_factor as tk
    from hf_q4shampoo import triton_roots as tr
    from hf_q4shampoo import triton_common as tc

    types = {"codes_ptr": "*u8", "lo_codes_ptr": "*u8", "res_codes_ptr": "*u8", "scales_ptr": "*u8",
             "res_scales_ptr": "*u8", "dbus_ptr": "*u8", "exp_ptr": "*i32", "res_exp_ptr": "*i32",
             "grid_j_ptr": "*i32", "dbus_j_ptr": "*i32", "row_j_ptr": "*i32", "row_ptr": "*u8", "keep_ptr": "*u8",
             "ef_beta": "fp32", "one_minus_beta": "fp32"}
    tiles = dict(TI=32)
    variants = [(tk._dequant_factor, dict(UPPER=2, COLUMN=True, **tiles)),
                (tk._dequant_factor, dict(UPPER=1, COLUMN=True, **tiles)),
                (tk._requant_lower, dict(UPPER=2, COLUMN=True, **tiles)),
                (tk._requant_lower, dict(UPPER=1, COLUMN=True, **tiles)),
                (tk._requant_upper, dict(UPPER=2, **tiles)),
                (tr._decode_symmetric, dict(OUT_BF16=False, REFINE=True, TILE=64)),
                (tc._scale_bytes, dict(KEEP=True, CHUNK=1024))]
    for fn, flags in variants:
        constants = dict(QBLOCK=64, **flags) if "QBLOCK" in fn.arg_names else flags
        signature = {a: "constexpr" if a in constants else types.get(a, "*fp32" if a.endswith("_ptr") else "i32")
                     for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(a),): v for a, v in constants.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=tk._EXACT).asm["ptx"]
        where = (fn.__name__, flags)
        assert not re.search(r"\\bfma\\.", ptx), where  # a contracted a * b + c rounds once, torch rounds twice
        assert not re.search(r"\\bdiv\\.(full|approx)", ptx), where  # approximate division: last-bit differences
    print("ok")
""")


def test_factor_kernels_compile_for_the_gpu_without_fma_or_approximate_division(tmp_path):
    # The interpreter runs the kernels in numpy, so it neither checks what only the compiler refuses (shapes that
    # tl.div_rn does not broadcast) nor what makes the GPU round differently from torch. Compiling to PTX for
    # sm_90 needs no GPU: Triton ships the compiler and ptxas.
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
