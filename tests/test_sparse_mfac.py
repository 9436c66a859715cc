"""SparseMFAC (EFCP, arXiv 2306.06098) against a plain fp64 dense M-FAC written here.

The reference keeps every compressed gradient as a dense fp64 vector, builds
``F = damp I + (1/m) sum c c^T`` explicitly and solves with it: no ring of sparse rows, no inner-product
matrix, no Woodbury. It applies the same error feedback (``a = e + g``, ``c = TopK(a)``, ``e = a - c``)
and the same update (``v = momentum v + F^{-1} c``; ``p <- (1 - wd) p - lr v``).
"""

from __future__ import annotations

import io

import pytest
import torch

from hf_q4shampoo import ConfigError, SparseMFAC
from hf_q4shampoo.memory import KINDS, optimizer_state_bytes

from tiny_hf import nested_tensors, one_torch_thread  # noqa: F401  (one_torch_thread: autouse fixture)

SHAPES = [(3, 4), (5,), (2, 3, 2)]  # one group of three tensors: d = 29


class DenseMFACReference:
    """fp64 M-FAC with an explicit empirical Fisher; top-k error feedback when ``k < d``."""

    def __init__(self, w0, *, m, damp, lr, k=None, momentum=0.0, weight_decay=0.0):
        self.w = w0.double().clone()
        d = self.w.numel()
        self.m, self.damp, self.lr, self.k = m, damp, lr, k or d
        self.momentum, self.wd = momentum, weight_decay
        self.window = [torch.zeros(d, dtype=torch.float64) for _ in range(m)]
        self.error = torch.zeros(d, dtype=torch.float64)
        self.v = torch.zeros(d, dtype=torch.float64)
        self.t = 0
        self.compressed = []  # c_t of every step

    def fisher(self):
        f = self.damp * torch.eye(self.w.numel(), dtype=torch.float64)
        return f + sum(torch.outer(c, c) for c in self.window) / self.m

    def step(self, g):
        a = self.error + g.double()
        c = torch.zeros_like(a)
        idx = torch.topk(a.abs(), self.k).indices
        c[idx] = a[idx]
        self.error = a - c
        self.window[self.t % self.m] = c
        self.compressed.append(c)
        self.t += 1
        u = torch.linalg.solve(self.fisher(), c)
        self.v = self.momentum * self.v + u if self.momentum else u
        self.w = (1 - self.wd) * self.w - self.lr * self.v


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _flat(params):
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def _grad_sequence(steps, d=29, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * (1 + t % 3) for t in range(steps)]  # varying scales


def _set_grads(params, flat):
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


#: Largest parameter difference from the fp64 reference, relative to how far the parameters moved. The
#: parameters are fp32, so every update rounds them by ~6e-8 |p|: a few 1e-6 after several steps.
FP32_TOLERANCE = 3e-5


def _run_against_reference(steps, *, k, window_format="auto", **hyper):
    params = _params()
    opt = SparseMFAC(params, k=k, window_format=window_format, **hyper)
    ref = DenseMFACReference(_flat(params), k=k, **hyper)
    worst = 0.0
    for g in _grad_sequence(steps):
        _set_grads(params, g)
        opt.step()
        ref.step(g)
        moved = (ref.w - _flat(_params())).abs().max()
        worst = max(worst, float((_flat(params) - ref.w).abs().max() / moved))
    return opt, ref, worst


# ---- equality with dense M-FAC -------------------------------------------------------------------


@pytest.mark.parametrize("window_format", ["auto", "sparse"])  # auto at k = d: full fp32 rows
def test_k_equal_d_is_dense_mfac(window_format):
    hyper = dict(m=4, damp=1e-2, lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt, ref, worst = _run_against_reference(9, k=29, window_format=window_format, **hyper)  # wraps the ring twice
    state = opt.group_state(0)
    assert ("window_indices" in state) == (window_format == "sparse")
    assert state["window_values"].shape == (4, 29)
    if window_format == "sparse":
        assert float(state["error"].abs().max()) == 0.0  # nothing is dropped at k = d
    else:
        assert "error" not in state  # dense M-FAC keeps no error accumulator
    assert worst < FP32_TOLERANCE, worst


def test_small_k_matches_reference_with_the_same_error_feedback():
    hyper = dict(m=3, damp=1e-3, lr=0.02, momentum=0.5)
    opt, ref, worst = _run_against_reference(8, k=3, **hyper)
    assert opt.group_state(0)["window_values"].shape == (3, 3)
    assert worst < FP32_TOLERANCE, worst
    assert torch.allclose(opt.group_state(0)["error"].double(), ref.error, atol=1e-5)


def test_ring_wraps_and_inner_products_follow_the_window():
    m, steps = 4, 11
    opt, ref, _ = _run_against_reference(steps, k=5, m=m, damp=1e-3, lr=0.01)
    state, window = opt.group_state(0), opt.window(0)
    for t in range(steps - m, steps):  # slot (t mod m) holds step t's compressed gradient
        assert torch.allclose(window.reconstruct(state, t % m).double(), ref.compressed[t], atol=1e-6)
    stored = torch.stack([window.reconstruct(state, s).double() for s in range(m)])
    # D was updated one row / column per step; it must equal G G^T of what is in the ring now
    assert torch.allclose(state["dots"], stored @ stored.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(k=6), dict(k=29), dict(variant="lowrank", rank=1)])
def test_dynamic_algorithm_equals_explicit_inverse(options):
    m, damp = 5, 1e-2
    params = _params()
    opt = SparseMFAC(params, m=m, damp=damp, lr=1e-3, **options)
    for g in _grad_sequence(7):  # wraps the ring
        _set_grads(params, g)
        opt.step()
    state, window = opt.group_state(0), opt.window(0)
    stored = torch.stack([window.reconstruct(state, s).double() for s in range(m)])
    fisher = damp * torch.eye(29, dtype=torch.float64) + stored.T @ stored / m
    x = torch.randn(29, generator=torch.Generator().manual_seed(5))
    expected = torch.linalg.solve(fisher, x.double())
    got = opt.precondition(x).double()
    assert float((got - expected).norm() / expected.norm()) < 1e-5


# ---- error feedback ----------------------------------------------------------------------------------


def test_error_feedback_keeps_every_gradient_entry():
    """sum of stored sparse parts + current error == sum of gradients (nothing is lost, only delayed)."""
    params = _params()
    opt = SparseMFAC(params, m=3, k=2, damp=1e-3, lr=1e-3)
    state, window = None, opt.window(0)
    sent = torch.zeros(29, dtype=torch.float64)
    grads = _grad_sequence(10)
    for t, g in enumerate(grads):
        _set_grads(params, g)
        opt.step()
        state = opt.group_state(0)
        sent += window.reconstruct(state, t % 3).double()
        assert int((window.reconstruct(state, t % 3) != 0).sum()) <= 2
    total = torch.stack(grads).double().sum(0)
    assert torch.allclose(sent + state["error"].double(), total, atol=1e-5)


def _least_squares(k, error_feedback, steps=1000):
    torch.manual_seed(0)
    d, n, batch = 200, 1000, 32
    x = torch.randn(n, d) * torch.logspace(0, -1, d)
    y = x @ torch.randn(d) + 0.1 * torch.randn(n)
    w = torch.nn.Parameter(torch.zeros(d))
    opt = SparseMFAC([w], lr=0.1, m=10, k=k, damp=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rows = torch.randint(0, n, (batch,), generator=g)
        w.grad = x[rows].T @ (x[rows] @ w.detach() - y[rows]) / batch
        opt.step()
        if not error_feedback:
            opt.group_state(0)["error"].zero_()
    return float(0.5 * ((x @ w.detach() - y) ** 2).mean()), float(0.5 * (y**2).mean())


def test_error_feedback_recovers_dense_mfac_at_one_percent_density():
    dense, start = _least_squares(200, True)
    sparse, _ = _least_squares(2, True)  # k = 1% of d
    dropped, _ = _least_squares(2, False)  # the same without error feedback
    assert dense < 0.05 * start
    assert sparse < 2 * dense, (sparse, dense)
    assert dropped > 4 * sparse, (dropped, sparse)


# ---- low-rank variant --------------------------------------------------------------------------------


def test_lowrank_stores_low_rank_gradients_exactly_and_feeds_back_the_rest():
    w = torch.nn.Parameter(torch.zeros(12, 9))
    b = torch.nn.Parameter(torch.zeros(9))
    opt = SparseMFAC([w, b], m=3, variant="lowrank", rank=2, damp=1e-2, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    state, window = None, opt.window(0)
    sent, total = torch.zeros(117, dtype=torch.float64), torch.zeros(117, dtype=torch.float64)
    for t in range(5):
        full_rank = t % 2 == 1
        w.grad = (
            torch.randn(12, 9, generator=g)
            if full_rank
            else torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g)
        )
        b.grad = torch.randn(9, generator=g)
        opt.step()
        state = opt.group_state(0)
        if t == 0:  # a rank-2 gradient and an empty error: one power iteration stores it exactly
            assert float(state["error"].abs().max()) < 1e-5
        sent += window.reconstruct(state, t % 3).double()
        total += torch.cat([w.grad.reshape(-1), b.grad]).double()
    assert float(state["error"][108:].abs().max()) == 0.0  # the bias is stored exactly
    assert float(state["error"].abs().max()) > 0.1  # full-rank gradients left a remainder
    assert torch.allclose(sent + state["error"].double(), total, atol=1e-4)
    assert state["window_left"].shape == (3, 12 * 2) and state["window_right"].shape == (3, 9 * 2)
    assert state["window_exact"].shape == (3, 9)


# ---- state dict and resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(k=4, momentum=0.9), dict(variant="lowrank", rank=1, momentum=0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_and_bitwise_resume(options, dtype):
    grads = _grad_sequence(10)
    params = _params(dtype=dtype)
    opt = SparseMFAC(params, m=3, damp=1e-2, lr=0.01, **options)
    for g in grads[:5]:
        _set_grads(params, g)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = SparseMFAC(resumed_params, m=3, damp=1e-2, lr=0.01, **options)
    resumed.load_state_dict(saved)
    before = {k: (v.dtype, v.shape) for k, v in opt.group_state(0).items()}
    assert {k: (v.dtype, v.shape) for k, v in resumed.group_state(0).items()} == before
    assert before["dots"][0] == torch.float64 and before["error"][0] == torch.float32
    for g in grads[5:]:
        for ps, o in ((params, opt), (resumed_params, resumed)):
            _set_grads(ps, g)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))
    a, b = list(nested_tensors(opt.state_dict()["state"])), list(nested_tensors(resumed.state_dict()["state"]))
    assert len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_resume_with_another_layout_is_refused():
    params = _params()
    opt = SparseMFAC(params, m=3, k=4)
    _set_grads(params, _grad_sequence(1)[0])
    opt.step()
    with pytest.raises(ConfigError, match="m: saved 3, now 5"):
        SparseMFAC(_params(), m=5, k=4).load_state_dict(opt.state_dict())


# ---- memory accounting -------------------------------------------------------------------------------


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for t in nested_tensors(dict(opt.state)))


def test_memory_report_by_kind():
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 5))
    groups = [{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias, model[1].bias]}]
    opt = SparseMFAC(groups, m=6, k_fraction=0.05, momentum=0.9)
    model(torch.randn(4, 30)).sum().backward()
    opt.step()
    r = optimizer_state_bytes(opt)
    d0, d1 = 30 * 20 + 20 * 5, 20 + 5
    k0, k1 = int(0.05 * d0), max(1, int(0.05 * d1))
    assert set(r.by_kind) == set(KINDS) and r.total == _state_bytes(opt)
    assert r.num_params == d0 + d1 and r.group_num_params == [d0, d1] and r.num_tensors == 4
    assert r.by_kind["statistics"] == 6 * (k0 + k1) * 4  # window values, fp32
    assert r.by_kind["indices"] == 6 * (k0 + k1) * 4  # window positions, int32
    assert r.by_kind["error_feedback"] == (d0 + d1) * 4
    assert r.by_kind["gram"] == 2 * 6 * 6 * 8  # one fp64 m x m matrix per group
    assert r.by_kind["first_order"] == (d0 + d1) * 4  # momentum
    assert r.largest[0]["name"] == "group 0 (2 tensors, flattened)" and r.largest[0]["numel"] == d0


def test_window_at_one_percent_is_under_a_fortieth_of_dense_mfac():
    """Issue 17's target, from real state tensors: values + indices + error accumulator vs the dense window."""
    m = 256  # the error accumulator (4 bytes per entry) is only amortised over a long window: m >= ~200

    def window_bytes(**options):
        model = torch.nn.Linear(200, 100)
        opt = SparseMFAC(model.parameters(), m=m, **options)
        model(torch.randn(2, 200)).sum().backward()
        opt.step()
        kinds = optimizer_state_bytes(opt).by_kind
        return kinds["statistics"] + kinds["indices"] + kinds["error_feedback"], opt.group_state(0)

    dense, dense_state = window_bytes(k_fraction=1.0)
    sparse, sparse_state = window_bytes(k_fraction=0.01)
    assert dense_state["window_values"].shape == (m, 20100) and "window_indices" not in dense_state
    assert "error" not in dense_state and dense == m * 20100 * 4  # dense M-FAC's window: m * d * 4
    assert sparse_state["window_indices"].dtype == torch.int32 and sparse_state["error"].shape == (20100,)
    assert sparse * 40 <= dense, (sparse, dense)


# ---- errors and edge cases ---------------------------------------------------------------------------


def test_sparse_and_complex_gradients_are_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        SparseMFAC(emb.parameters()).step()
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    z.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        SparseMFAC([z]).step()


def test_missing_gradients():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = SparseMFAC([{"params": [a]}, {"params": [b]}], m=2, k=2, lr=0.1)
    a.grad = torch.tensor([1.0, -3.0, 2.0, 0.5])
    opt.step()  # b has no gradient: its group takes no step and gets no state
    assert int(opt.group_state(0)["step"]) == 1 and not opt.group_state(1)
    assert torch.equal(b.detach(), torch.ones(3))
    moved = a.detach() != 1
    assert moved.tolist() == [False, True, True, False]  # only the two top-k entries moved


# ---- the GPU benchmark script runs (on a CPU, tiny model) -------------------------------------------


def test_benchmark_script_smoke(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "sparse_mfac_bench.py"
    spec = importlib.util.spec_from_file_location("sparse_mfac_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(
            [
                "--smoke",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--optimizers",
                "adamw,sparse_mfac,lowrank_mfac,dense_mfac",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "sparse_mfac_bench.json").read_text())
    assert [r["status"] for r in saved["rows"]] == ["ok"] * 4 and saved["date_utc"] and saved["machine"]["torch"]
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert rows["dense_mfac"]["state_by_kind"]["indices"] == 0 and rows["sparse_mfac"]["state_by_kind"]["indices"] > 0
    assert 0 < saved["summary"]["window_sparse_over_dense"] < 1


def test_products_read_only_the_written_rows_of_a_filling_ring():
    """Before the ring is full, ``G x`` and ``G^T b`` equal the fp64 products over the written rows, whatever the
    unwritten rows hold (they are skipped: scattering their zeros at position 0 serialised on a GPU)."""
    from hf_q4shampoo.mfac_window import TopKWindow

    gen = torch.Generator().manual_seed(3)
    m, d, k, written = 8, 300, 20, 3
    window = TopKWindow(m, d, k)
    state: dict = {}
    window.init_state(state, torch.device("cpu"))
    state["step"] = torch.tensor(float(written))
    for slot in range(written):
        state["window_values"][slot] = torch.randn(k, generator=gen)
        state["window_indices"][slot] = torch.randperm(d, generator=gen)[:k].int()
    rows = torch.stack([window.reconstruct(state, s) for s in range(written)]).double()
    state["window_values"][written:] = float("nan")  # would poison both products if they were read
    x, coef = torch.randn(d, generator=gen), torch.randn(m, generator=gen)

    dots = window.dots(state, x)
    assert torch.equal(dots[written:], torch.zeros(m - written))
    torch.testing.assert_close(dots[:written].double(), rows @ x.double(), rtol=1e-6, atol=1e-6)
    combined = window.combine(state, coef)
    torch.testing.assert_close(combined.double(), coef[:written].double() @ rows, rtol=1e-6, atol=1e-6)
