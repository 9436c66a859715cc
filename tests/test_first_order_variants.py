"""The factored second moment (``first_order_v="factored"``, paper 3's 4-bit Factor) and the signed moments' code
(``first_order_m_map``) against an fp64 oracle."""

import copy
import io

import pytest
import torch

from hf_q4shampoo import ConfigError, Q4Shampoo, triton_kernels
from hf_q4shampoo.memory import optimizer_state_bytes
from hf_q4shampoo.moments import factored_shape
from hf_q4shampoo.quant import dequantize_log_blockwise, quantize_log_blockwise

SHAPES = [(96, 70), (32, 16, 3, 3), (70,), (40, 30), (5000, 1)]  # matrix, conv, 1-D, small, column vector


def test_which_tensors_are_factored():
    assert factored_shape((96, 70), "factored") == (96, 70)
    assert factored_shape((32, 16, 3, 3), "factored") == (32, 144)  # trailing dims flattened, as Shampoo does
    assert factored_shape((40, 30), "factored") is None  # <= 4096 entries: plain fp32 moments
    assert factored_shape((70,), "factored") is None
    assert factored_shape((5000, 1), "factored") is None  # a vector in disguise
    assert factored_shape((96, 70), "rank1") is None


def _reference_adam_factored(params, grads_seq, lr, betas, eps, wd, m_roundtrip=None):
    """fp64 AdamW whose v is Adafactor's ``row col^T / mean(row)`` for factored shapes (plain v otherwise);
    ``m_roundtrip`` stands for the 4-bit storage of m between steps."""
    b1, b2 = betas
    ps = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [None] * len(ps)
    for t, grads in enumerate(grads_seq, start=1):
        for i, (p, g) in enumerate(zip(ps, grads)):
            g = g.double()
            p.mul_(1 - lr * wd)
            m_new = b1 * m[i] + (1 - b1) * g  # this step uses m before it is stored (and quantized)
            m[i] = m_roundtrip(m_new) if m_roundtrip is not None and p.numel() > 4096 else m_new
            shape = factored_shape(tuple(p.shape), "factored")
            if shape is None:
                v[i] = (b2 * v[i] if v[i] is not None else 0) + (1 - b2) * g * g
                v_full = v[i]
            else:
                g2 = (g * g).reshape(shape)
                row, col = (
                    v[i]
                    if v[i] is not None
                    else (torch.zeros(shape[0], dtype=torch.float64), torch.zeros(shape[1], dtype=torch.float64))
                )
                row = b2 * row + (1 - b2) * g2.mean(1)
                col = b2 * col + (1 - b2) * g2.mean(0)
                v[i] = (row, col)
                v_full = (torch.outer(row, col) / row.mean()).reshape(p.shape)
            denom = (v_full / (1 - b2**t)).sqrt() + eps
            p.sub_(lr * (m_new / (1 - b1**t)) / denom)
    return ps


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    # row- and column-dependent scales, so the factorisation is not trivially exact
    return [
        [
            torch.randn(*s, generator=g)
            * torch.linspace(0.2, 2.0, s[0]).reshape(-1, *([1] * (len(s) - 1)))
            * torch.rand(s[-1], generator=g).add(0.5)
            for s in SHAPES
        ]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("bits,m_map", [(32, "dynamic"), (4, "dynamic"), (4, "linear2")])
def test_factored_adam_matches_fp64_oracle(bits, m_map):
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    params = _params()
    start = [p.detach().double().clone() for p in params]
    # no preconditioning: the first-order step alone is under test
    opt = Q4Shampoo(
        params,
        first_order_v="factored",
        first_order_bits=bits,
        first_order_m_map=m_map,
        min_precond_numel=10**9,
        **hyper,
    )
    grads_seq = _grads(8)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    # 4-bit m: the oracle applies the same codec to m after every update (block 256, m_map's code)
    m_rt = None
    if bits == 4:

        def m_rt(x):
            q = quantize_log_blockwise(x.float().reshape(1, -1), m_map, 256, exponent_dims=1)  # first_order_m_block
            return dequantize_log_blockwise(q, x.numel(), m_map, 256).double().reshape(x.shape)

    ref = _reference_adam_factored(
        start, grads_seq, hyper["lr"], hyper["betas"], hyper["eps"], hyper["weight_decay"], m_rt
    )
    for p, r, p0 in zip(params, ref, start):
        err = float((p.detach().double() - r).norm() / (r - p0).norm())
        print(tuple(p.shape), bits, f"{err:.2e}")
        assert err < (1e-5 if bits == 32 else 1e-3)
    state = opt.state[params[0]]
    assert state["exp_avg_sq_row"].shape == (96,) and state["exp_avg_sq_col"].shape == (70,)
    assert "exp_avg_sq_row" in opt.state[params[1]] and "exp_avg_sq_row" not in opt.state[params[2]]


def test_factored_state_bytes_and_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 128, bias=False)
    sizes = {}
    for v in ("rank1", "factored"):
        opt = Q4Shampoo(model.parameters(), first_order_v=v, min_precond_numel=10**9)
        opt.build_state()
        sizes[v] = optimizer_state_bytes(opt).by_kind["first_order"]
    numel = 256 * 128
    assert sizes["rank1"] == numel  # 4-bit m and 4-bit v codes
    assert sizes["factored"] == numel // 2 + 4 * (256 + 128)  # 4-bit m, fp32 row and column means

    opt = Q4Shampoo(model.parameters(), first_order_v="factored", update_freq=1, root_freq=2)
    for _ in range(3):
        model.weight.grad = torch.randn_like(model.weight)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    again = Q4Shampoo(model.parameters(), first_order_v="factored", update_freq=1, root_freq=2)
    again.load_state_dict(saved)
    torch.testing.assert_close(again.state[model.weight]["exp_avg_sq_row"], opt.state[model.weight]["exp_avg_sq_row"])
    with pytest.raises(ConfigError, match="first_order_v: saved 'factored', now 'rank1'"):
        Q4Shampoo(model.parameters(), first_order_v="rank1", update_freq=1, root_freq=2).load_state_dict(saved)


def test_triton_kernels_take_both_v_layouts_of_4bit_moments(monkeypatch):
    # CUDA routes 4-bit matrices to the Triton kernels when supports() says so: rank-1 4-bit or factored v
    # (the kernels against the torch math: test_triton_interpret.py, test_cuda.py); fp32 moments go to torch
    monkeypatch.setattr(triton_kernels, "HAS_TRITON", True)
    p = torch.nn.Parameter(torch.randn(96, 70))
    for v, bits, expected in (("rank1", 4, True), ("factored", 4, True), ("factored", 32, False)):
        opt = Q4Shampoo([p], first_order_v=v, first_order_bits=bits, min_precond_numel=10**9)
        opt.build_state()
        moments = {k: t.unsqueeze(0) for k, t in opt.state[p].items() if k.startswith("exp_avg")}
        assert triton_kernels.supports([p], torch.randn(1, 96, 70), moments) is expected, (v, bits)


def test_one_sided_factors_v_only_where_shampoo_preconditions_one_side():
    # an embedding 5000 x 64 (aspect ratio 78 > max_aspect_ratio 16: only its 64 side has a factor) gets the
    # factored v; a 64 x 256 matrix (both sides preconditioned) keeps the rank-1 4-bit v; a vector plain fp32
    torch.manual_seed(0)
    emb, lin, bias = (torch.nn.Parameter(torch.randn(*s)) for s in ((5000, 64), (64, 256), (256,)))
    opt = Q4Shampoo([emb, lin, bias], first_order_v="one_sided", update_freq=1, root_freq=2)
    assert opt.block_plan(emb.shape).one_sided and not opt.block_plan(lin.shape).one_sided
    for _ in range(3):
        for p in (emb, lin, bias):
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt.state[emb]["exp_avg_sq_row"].shape == (5000,) and opt.state[emb]["exp_avg_sq_col"].shape == (64,)
    assert "exp_avg_sq_codes" in opt.state[lin] and "exp_avg_sq_row" not in opt.state[lin]
    assert "exp_avg_sq" in opt.state[bias]
    assert float(opt.state[emb]["exp_avg_sq_row"].min()) > 0  # updated, from fresh gradients
    # the same as first_order_v="factored" on the embedding and "rank1" on the matrix, to the last bit
    runs = {}
    for v in ("one_sided", "factored", "rank1"):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in ((5000, 64), (64, 256))]
        o = Q4Shampoo(params, first_order_v=v, update_freq=1, root_freq=2)
        for _ in range(3):
            for q in params:
                q.grad = torch.randn_like(q)
            o.step()
        runs[v] = [q.detach().clone() for q in params]
    assert torch.equal(runs["one_sided"][0], runs["factored"][0]) and torch.equal(
        runs["one_sided"][1], runs["rank1"][1]
    )
    assert not torch.equal(runs["one_sided"][0], runs["rank1"][0])


def test_invalid_first_order_v():
    with pytest.raises(ConfigError, match="first_order_v='adafactor' is not valid"):
        Q4Shampoo([torch.nn.Parameter(torch.zeros(3))], first_order_v="adafactor")


def test_linear2_momentum_buffer_of_sgd():
    # SGD's momentum uses the same signed codec; with m_map=linear2 a block whose largest entry is negative
    # keeps it, to the bf16 rounding of its block scale (-1 is in the table; the dynamic code's most negative entry
    # is -0.8875, so it loses 11%)
    from hf_q4shampoo.moments import decode_signed

    g = -torch.rand(128, 40, generator=torch.Generator().manual_seed(0)) - 0.5  # 40 blocks of 128, all negative
    for m_map, shrink in (("linear2", 1.0), ("dynamic", 0.8875)):
        p = torch.nn.Parameter(torch.zeros(128, 40))
        opt = Q4Shampoo([p], lr=0.1, first_order="sgd", momentum=0.9, first_order_m_map=m_map, min_precond_numel=10**9)
        p.grad = g.clone()
        opt.step()  # first step: buffer = g
        st = opt.state[p]
        stored = {suffix: st[f"momentum_buffer{suffix}"] for suffix in ("_codes", "_scales", "_scale_exp")}
        buf = decode_signed(stored, (1, 128, 40), m_map)[0]
        # within the scale grid's half step (2^(1/32): the stored scale is the absmax's nearest grid point)
        torch.testing.assert_close(
            buf.reshape(-1, 128).amin(-1), shrink * g.reshape(-1, 128).amin(-1), rtol=2 ** (1 / 32) - 1, atol=0
        )


def test_checkpoint_of_another_first_order_v_loads_where_every_state_fits():
    # first_order_v only changes the state of some parameters: a rank-1 checkpoint of a model without one-sided
    # matrices resumes under "one_sided" to the last bit; with an embedding it is refused, naming the option
    def run(v, shapes, saved=None, steps=2):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
        opt = Q4Shampoo(params, first_order_v=v, update_freq=1, root_freq=2)
        if saved is not None:
            opt.load_state_dict(copy.deepcopy(saved))  # the loaded state takes the saved tensors, as torch's does
        for step in range(steps):
            torch.manual_seed(100 + step)
            for q in params:
                q.grad = torch.randn_like(q)
            opt.step()
        return params, opt

    square = [(64, 256), (128, 64)]
    _, opt = run("rank1", square)
    saved = opt.state_dict()
    resumed, _ = run("one_sided", square, saved)
    again, _ = run("rank1", square, saved)
    assert all(torch.equal(a, b) for a, b in zip(resumed, again))
    _, opt = run("rank1", [(5000, 64)])
    with pytest.raises(ConfigError, match="first_order_v: saved 'rank1', now 'one_sided'"):
        run("one_sided", [(5000, 64)], opt.state_dict())
