import copy
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from old_formats import old_scale_format

from hf_q4shampoo import ConfigError, Q4AdamW, Q4Shampoo, Q4ShampooConfig
from hf_q4shampoo.config import STATE_LAYOUT_KEYS
from hf_q4shampoo.schedule import root_shift

from reference_shampoo import ReferenceShampoo

SHAPES = [(40, 70), (8, 3, 3, 3), (300, 10), (70,), (1, 50, 1)]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in SHAPES]


def _grads(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    # gradients with a correlated (anisotropic) structure, so preconditioning matters
    out = []
    for _ in range(steps):
        out.append([torch.randn(*s, generator=g) * torch.linspace(0.1, 3.0, s[-1]) for s in SHAPES])
    return out


@pytest.mark.parametrize(
    "first_order,extra",
    [
        ("adamw", dict(weight_decay=0.1)),
        ("sgd", dict(weight_decay=0.01, momentum=0.9, nesterov=False)),
        ("sgd", dict(weight_decay=0.0, momentum=0.8, nesterov=True)),
    ],
)
def test_fp32_form_matches_fp64_algorithm4(first_order, extra):
    hyper = dict(lr=0.01, stat_decay=0.9, matrix_eps=1e-4, update_freq=2, root_freq=4, max_precond_dim=32, **extra)
    spread = {"refresh_spread": 1}  # paper 2's schedule: every matrix refreshed on the same steps
    params = _params()
    start = [p.detach().double().clone() for p in params]
    ref = ReferenceShampoo(params, first_order=first_order, **hyper)
    opt = Q4Shampoo(
        params, precond="fp32", first_order=first_order, first_order_bits=32, root_method="eigh", **hyper, **spread
    )
    worst = 0.0
    for grads in _grads(13):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        # error relative to how far the parameters moved: fp32 storage of p alone gives ~1e-5
        for p, r, p0 in zip(params, ref.params, start):
            worst = max(worst, float((p.detach().double() - r).norm() / (r - p0).norm()))
    print(f"{first_order}: worst relative error of the parameter displacement vs fp64, 13 steps: {worst:.2e}")
    assert worst < 2e-4


def test_preconditioning_is_applied():
    # the same run without Shampoo must differ: guards against a silently skipped preconditioner
    params_a, params_b = _params(), _params()
    opt_a = Q4Shampoo(params_a, lr=0.01, precond="fp32", update_freq=1, root_freq=1, first_order_bits=32)
    opt_b = torch.optim.Adam(params_b, lr=0.01)
    for grads in _grads(3):
        for pa, pb, g in zip(params_a, params_b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert (params_a[0] - params_b[0]).abs().max() > 1e-4
    # 1-D parameters take the plain first-order step in both
    torch.testing.assert_close(params_a[3], params_b[3])


def _train(opt_factory, params, grads_seq):
    opt = opt_factory(params)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
    return opt


def _roundtrip(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _state_dtypes(opt):
    out = {}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):

        def walk(prefix, v, i=i):
            if isinstance(v, torch.Tensor):
                out[f"{i}.{prefix}"] = v.dtype
            elif isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}", x)
            elif isinstance(v, list):
                for k, x in enumerate(v):
                    walk(f"{prefix}.{k}", x)

        walk("", opt.state[p])
    return out


@pytest.mark.parametrize("precond", ["cholesky_ef", "eigen", "naive", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_resume(precond, dtype):
    kw = dict(lr=0.01, precond=precond, update_freq=2, root_freq=3, max_precond_dim=64, min_quant_numel=256)
    grads = _grads(9)
    straight = _params(dtype=dtype)
    _train(lambda p: Q4Shampoo(p, **kw), straight, grads)

    first = _params(dtype=dtype)
    opt1 = _train(lambda p: Q4Shampoo(p, **kw), first, grads[:4])
    saved = _roundtrip(opt1)  # torch.load(weights_only=True)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = Q4Shampoo(resumed, **kw)
    opt2.load_state_dict(saved)
    assert _state_dtypes(opt2) == _state_dtypes(opt1)  # uint8 codes stay uint8, fp32 stays fp32
    dtypes = set(_state_dtypes(opt2).values())
    assert torch.float32 in dtypes and (precond == "fp32" or torch.uint8 in dtypes)
    for grads_t in grads[4:]:
        for p, g in zip(resumed, grads_t):
            p.grad = g.clone().to(dtype)
        opt2.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), "resumed run must be bitwise identical on CPU"


def test_lazy_state_and_device():
    params = _params()
    opt = Q4Shampoo(params, lr=1e-3)
    assert len(opt.state) == 0
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g
    opt.step()
    assert len(opt.state) == len(params)
    st = opt.state[params[0]]
    assert st["step"].device.type == "cpu" and "regions" in st
    assert "regions" not in opt.state[params[3]]  # 1-D: first-order only


def test_tensor_lr_matches_float_lr():
    grads = _grads(5)
    a, b = _params(), _params()
    _train(lambda p: Q4Shampoo(p, lr=0.01, update_freq=1, root_freq=2), a, grads)
    lr = torch.tensor(0.02)
    opt = Q4Shampoo(b, lr=lr, update_freq=1, root_freq=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # writes 0.01 into the tensor
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for grads_t in grads:
        for p, g in zip(b, grads_t):
            p.grad = g.clone()
        opt.step()
        sched.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_param_groups_and_empty_group():
    params = _params()
    opt = Q4Shampoo(
        [
            {"params": params[:2], "weight_decay": 0.1},
            {"params": [], "weight_decay": 0.0},
            {"params": params[2:], "lr": 0.0},
        ],
        lr=0.01,
    )
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g
    opt.step()
    assert not torch.equal(before[0], params[0])
    for b, p in zip(before[2:], params[2:]):  # lr 0 group does not move
        assert torch.equal(b, p)


def test_zero_gradients_and_zero_lr_are_safe():
    # LoRA B = 0 at start makes A's gradients exactly zero; torch's DCP init steps with lr 0 and zero grads
    params = _params()
    opt = Q4Shampoo(params, lr=0.0, update_freq=1, root_freq=1)
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
    opt.param_groups[0]["lr"] = 0.01
    for grads in _grads(3):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()


def test_bf16_parameters_train_with_fp32_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8)).to(torch.bfloat16)
    opt = Q4Shampoo(model.parameters(), lr=3e-3, update_freq=1, root_freq=2, min_quant_numel=1024)
    x = torch.randn(256, 64).to(torch.bfloat16)
    y = torch.randint(0, 8, (256,))
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    side = opt.state[model[0].weight]["regions"][0]["R"]
    assert side["factor_codes"].dtype == torch.uint8 and side["diag"].dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16


def test_clear_errors():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ConfigError, match="unknown option.*'precondd'.*Allowed options"):
        Q4Shampoo([p], precondd="eigen")
    with pytest.raises(ConfigError, match="precond='bad' is not valid; allowed values: 'cholesky_ef'"):
        Q4Shampoo([p], precond="bad")
    with pytest.raises(ConfigError, match='update_freq must be "auto" or an integer >= 1, got 0'):
        Q4Shampoo([p], update_freq=0)
    with pytest.raises(ConfigError, match="betas"):
        Q4Shampoo([{"params": [p], "betas": (0.9, 1.5)}])
    with pytest.raises(ConfigError, match="stat_decay must be a number in"):
        Q4ShampooConfig(stat_decay=1.0)

    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Q4Shampoo(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*SparseAdam"):
        opt.step()

    # after a dense first step (state made, the parameter's checks done) a sparse gradient is still refused
    dense = torch.nn.Parameter(torch.randn(10, 4))
    for optimizer in (Q4Shampoo, Q4AdamW):
        opt = optimizer([dense])
        dense.grad = torch.randn(10, 4)
        opt.step()
        dense.grad = torch.randn(10, 4).to_sparse()
        with pytest.raises(RuntimeError, match="sparse gradients.*SparseAdam"):
            opt.step()

    c = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    c.grad = torch.randn(3, 3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex.*view_as_real"):
        Q4Shampoo([c]).step()

    flat = torch.nn.Parameter(torch.randn(1000))
    flat._fsdp_flattened = True  # what FSDP1 sets on its flattened views (torch _set_fsdp_flattened)
    flat.grad = torch.randn(1000)
    with pytest.raises(RuntimeError, match="flattened 1-D view.*FSDP2"):
        Q4Shampoo([flat]).step()


def test_checkpoint_with_other_storage_options_is_refused():
    params = _params()
    opt = _train(lambda p: Q4Shampoo(p, lr=0.01), params, _grads(1))
    other = Q4Shampoo(params, lr=0.01, precond="eigen")
    with pytest.raises(ConfigError, match="precond: saved 'cholesky_ef', now 'eigen'"):
        other.load_state_dict(_roundtrip(opt))


# ------------------------------------------------------------------------------------------------
# A small ill-conditioned learning problem: teacher MLP, inputs with condition number 1e4 in a
# random basis, noisy targets (so the loss has a floor and "within a few percent" is meaningful).
# ------------------------------------------------------------------------------------------------


def _fit(make_opt, seed):
    """Final loss of the teacher-student task (benchmarks/quality_cpu.py's ``teacher``: tanh MLP, inputs of
    condition number 1e4 in a random basis, 200 steps of 256) trained with ``make_opt(params)``."""
    return _quality_cpu().teacher(lambda params, steps: make_opt(params), seed)


def _quality_cpu():
    spec = importlib.util.spec_from_file_location(
        "quality_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "quality_cpu.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.heavy
def test_cholesky_ef_close_to_fp32_and_beats_adamw():
    shampoo_grid, adam_grid = [3e-3, 1e-2, 3e-2], [3e-3, 1e-2, 3e-2, 1e-1]
    kw = dict(update_freq=1, root_freq=10)
    makers = {
        "adamw": (adam_grid, lambda lr: lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)),
        "fp32": (shampoo_grid, lambda lr: lambda p: Q4Shampoo(p, lr=lr, precond="fp32", first_order_bits=32, **kw)),
        "cholesky_ef": (shampoo_grid, lambda lr: lambda p: Q4Shampoo(p, lr=lr, **kw)),
        "naive": (shampoo_grid, lambda lr: lambda p: Q4Shampoo(p, lr=lr, precond="naive", **kw)),
    }
    # each optimizer's best learning rate from its grid, final loss averaged over two problems
    best = {
        name: min(sum(_fit(make(lr), seed) for seed in (0, 1)) / 2 for lr in grid)
        for name, (grid, make) in makers.items()
    }
    print("best final loss per optimizer (grid-tuned lr, mean of 2 seeds):", {k: round(v, 4) for k, v in best.items()})
    assert best["cholesky_ef"] <= 1.05 * best["fp32"]
    assert best["cholesky_ef"] < 0.97 * best["adamw"]
    assert best["naive"] > best["cholesky_ef"]


def test_refresh_spread_balances_and_shifts_the_schedule():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(80, 80)) for _ in range(6)] + [torch.nn.Parameter(torch.randn(200, 160))]
    opt = Q4Shampoo(params, lr=1e-3, update_freq=2, root_freq=4, refresh_spread=4)
    form = opt._form(torch.device("cpu"))
    eye = torch.eye(80)
    first_change = {}
    for step in range(1, 10):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for k, p in enumerate(params[:6]):
            root = form.root(opt.state[p]["regions"][0]["L"])[0]
            if k not in first_change and not torch.equal(root, eye):
                first_change[k] = step
    stats = [opt.state[p]["refresh_offset"] for p in params]
    roots = [opt.state[p]["root_offset"] for p in params]
    assert sorted(set(stats)) == [0, 1]  # statistics spread over min(spread, update_freq) = 2 steps
    # costs (sum of n^3): the 200x160 matrix 12.1M, each 80x80 one 1.0M; a step's share is 18.2M / 4, so
    # the 80x80 stack is cut into runs of round(4.55 / 1.02) = 4 consecutive parameters: 4 + 2
    assert roots[6] == 0  # the largest unit is placed first
    assert len(set(roots[:4])) == 1 and len(set(roots[4:6])) == 1
    assert len({roots[0], roots[4], roots[6]}) == 3
    for k in range(6):  # each matrix's first root comes at root_freq + its root offset
        assert first_change[k] == 4 + roots[k]
    # a resumed optimizer keeps the saved offsets
    again = Q4Shampoo(params, lr=1e-3, update_freq=2, root_freq=4, refresh_spread=4)
    again.load_state_dict(_roundtrip(opt))
    assert [again.state[p]["root_offset"] for p in params] == roots
    assert [again.state[p]["refresh_offset"] for p in params] == stats


def test_first_root_step_adds_one_early_root_then_keeps_the_grid():
    # first_root_step=6 with root_freq=10, spread 3: each matrix's first root at 6 + its offset, then 10 + offset,
    # 20 + offset (the grid); a value past the grid's first root changes nothing
    from hf_q4shampoo.schedule import first_root, root_due

    assert [t for t in range(1, 31) if root_due(t, 10, 1, 2, 6)] == [8, 12, 22]
    assert first_root(10, 1, 2, 6) == 8 and first_root(10, 1, 2, 0) == 12 and first_root(10, 1, 2, 10) == 12
    assert [t for t in range(1, 31) if root_due(t, 10, 1, 2, 10)] == [12, 22]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(48, 40)) for _ in range(4)]
    opt = Q4Shampoo(params, lr=1e-3, update_freq=2, root_freq=10, refresh_spread=3, first_root_step=6)
    form = opt._form(torch.device("cpu"))
    changes: dict[int, list[int]] = {k: [] for k in range(4)}
    previous = [None] * 4
    for step in range(1, 25):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for k, p in enumerate(params):
            root = form.root(opt.state[p]["regions"][0]["L"])[0].clone()
            if previous[k] is not None and not torch.equal(root, previous[k]):
                changes[k].append(step)
            previous[k] = root
    for k, p in enumerate(params):
        offset = opt.state[p]["root_offset"]
        assert changes[k] == [6 + offset, 10 + offset, 20 + offset]
    with pytest.raises(ConfigError, match="first_root_step"):
        Q4Shampoo(params, lr=1e-3, first_root_step=-1)


def test_statistics_of_one_order_are_updated_in_one_call_and_as_one_at_a_time(monkeypatch):
    # two shape groups whose factors share orders (48: L of both, 40: R of the first, 24: R of the second): a step
    # with all statistics due takes one batched update per order; pieces of one member each give the same bits
    from hf_q4shampoo import refresh

    def run(entries):
        monkeypatch.setattr(refresh, "_STATS_CALL_ENTRIES", entries)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(48, 40)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(48, 24))]
        opt = Q4Shampoo(params, lr=1e-2, update_freq=1, root_freq=3, refresh_spread=1)
        form = type(opt._form(torch.device("cpu")))
        calls = []
        original = form.update_statistics
        monkeypatch.setattr(
            form, "update_statistics", lambda self, st, gram: calls.append(len(gram)) or original(self, st, gram)
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        monkeypatch.setattr(form, "update_statistics", original)
        return [p.detach().clone() for p in params], calls

    merged, merged_calls = run(1 << 24)
    single, single_calls = run(1)
    assert len(merged_calls) == 7 * 3 and sorted(set(merged_calls)) == [1, 3, 4]  # orders 24, 40, 48 per step
    assert len(single_calls) == 7 * 8 and set(single_calls) == {1}  # 4 members x 2 sides, one factor each
    assert all(torch.equal(a, b) for a, b in zip(merged, single))


def test_equal_frequencies_put_statistics_and_roots_on_different_steps():
    # update_freq = root_freq = 8, spread 3: statistics on residues 0-2, roots moved to 3-5 (schedule.root_shift);
    # no step then pays for both, and every factor still refreshes every 8 steps
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(80, 80)) for _ in range(6)]
    opt = Q4Shampoo(params, lr=1e-3, update_freq=8, root_freq=8, refresh_spread=3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    stats = {opt.state[p]["refresh_offset"] for p in params}
    roots = {opt.state[p]["root_offset"] for p in params}
    assert stats == {0, 1, 2} and roots == {3, 4, 5}
    # without room for both spreads in one period the offsets overlap as before
    crowded = Q4Shampoo(params, lr=1e-3, update_freq=8, root_freq=8, refresh_spread=5)
    crowded.step()
    assert {crowded.state[p]["root_offset"] for p in params} <= set(range(5))
    assert root_shift(10, 100, (10, 25)) == 0 and root_shift(50, 100, (25, 25)) == 25
    assert root_shift(30, 100, (10, 10)) == 0  # 30 does not divide 100: residues would drift
    assert root_shift(2, 4, (1, 1)) == 0  # refresh_spread=1: paper 2's schedule, roots on the statistics' step


def test_statistics_spread_narrows_the_statistics_offsets_only():
    # statistics_spread=2: statistics of the six matrices on residues 0-1 (three per call instead of one or two),
    # the roots still over refresh_spread=6 offsets; 0 follows refresh_spread
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(80, 80)) for _ in range(6)]
    for p in params:
        p.grad = torch.randn_like(p)
    narrow = Q4Shampoo(params, lr=1e-3, update_freq=10, root_freq=100, refresh_spread=6, statistics_spread=2)
    narrow.step()
    assert {narrow.state[p]["refresh_offset"] for p in params} == {0, 1}
    assert len({narrow.state[p]["root_offset"] for p in params}) == 6
    wide = Q4Shampoo(params, lr=1e-3, update_freq=10, root_freq=100, refresh_spread=6, statistics_spread=0)
    wide.step()
    assert len({wide.state[p]["refresh_offset"] for p in params}) == 6
    with pytest.raises(ConfigError, match="statistics_spread"):
        Q4Shampoo(params, statistics_spread=-1)


def test_bf16_application_is_close_to_fp32():
    torch.manual_seed(0)
    grads = [torch.randn(96, 130) * torch.linspace(0.1, 3, 130) for _ in range(4)]
    out = {}
    for dtype in ("float32", "bfloat16"):
        p = torch.nn.Parameter(torch.zeros(96, 130))
        opt = Q4Shampoo([p], lr=1e-3, update_freq=1, root_freq=1, apply_dtype=dtype)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[dtype] = opt._direction(p, grads[-1])
    rel = float((out["bfloat16"] - out["float32"]).norm() / out["float32"].norm())
    print(f"bf16 vs fp32 preconditioned direction: relative difference {rel:.2e}")
    assert 0 < rel < 1e-2


def test_first_order_only_tensors_follow_torch_adamw():
    # 1-D and small tensors take AdamW alone (fp32 moments, torch's fused kernel): the same trajectory as
    # torch.optim.AdamW, with each moment in a buffer of its own
    g = torch.Generator().manual_seed(3)
    shapes = [(70,), (30, 20)]  # (30, 20): 600 entries, under min_precond_numel? no: under min_quant_numel
    ours = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = Q4Shampoo(ours, lr=0.02, weight_decay=0.1, min_precond_numel=10**6)
    torch_opt = torch.optim.AdamW(ref, lr=0.02, weight_decay=0.1)
    for _ in range(6):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, ref):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    st = opt.state[ours[0]]
    assert st["exp_avg"].data_ptr() != st["exp_avg_sq"].data_ptr()


# ------------------------------------------------------------------------------------------------
# Non-finite gradients (issue 12): a NaN/inf entry skips that parameter's whole update for that step
# ------------------------------------------------------------------------------------------------


def _state_tensors(opt, p) -> dict:
    """Every tensor of a parameter's state (copied) and the parameter itself, by path."""
    out = {"param": p.detach().clone()}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value.clone()
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{prefix}[{i}]", item)

    walk("state", opt.state[p])
    return out


def _changed(before: dict, after: dict) -> list[str]:
    counters = ("state.step", "state.skipped_updates")
    return [k for k in before if k not in counters and not torch.equal(before[k], after[k])]


@pytest.mark.parametrize(
    "precond,grafting",
    [
        ("cholesky_ef", "norm"),
        ("eigen", "norm"),
        ("fp32", "norm"),
        ("cholesky_ef", "adam"),
        ("fp32", "adam"),
    ],
)
@pytest.mark.parametrize(
    "bad_step,max_dim,bad_value",
    [
        (3, 1024, float("nan")),  # a statistics-only step (roots at 2, 4, ...), one block per side
        (4, 1024, float("inf")),  # a statistics + root step
        (3, 48, float("nan")),  # four blocks: the finite blocks' statistics must not move either
    ],
)
def test_nan_gradient_skips_only_that_step(precond, grafting, bad_step, max_dim, bad_value):
    # the reproduction: 96x80, update_freq=1, root_freq=2, good steps, one bad entry, good steps
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(96, 80, generator=g) * torch.linspace(0.1, 3, 80) for _ in range(8)]
    start = torch.randn(96, 80, generator=g)
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    kw = dict(lr=1e-2, update_freq=1, root_freq=2, precond=precond, max_precond_dim=max_dim, grafting=grafting)
    opt, ref = Q4Shampoo([p], **kw), Q4Shampoo([q], **kw)
    for t, grad in enumerate(grads, 1):
        if t == bad_step:
            before = _state_tensors(opt, p)
            bad = grad.clone()
            bad[3, 5] = bad_value
            p.grad = bad
            opt.step()
            assert _changed(before, _state_tensors(opt, p)) == []  # statistics, roots, moments, parameter
            ref.state[q]["step"] += 1  # the reference just lets that step pass
            continue
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p, q)  # only that step's update is missing
    assert opt.skipped_updates() == 1 and int(opt.state[p]["skipped_updates"]) == 1
    assert int(opt.state[p]["step"]) == len(grads)


@pytest.mark.parametrize(
    "first_order,bits,extra",
    [
        ("adamw", 4, {}),  # 4-bit moments (torch math)
        ("adamw", 32, {}),  # fp32 moments: torch's fused AdamW (batch of one and batches of several)
        ("sgd", 4, {"nesterov": True}),
        ("sgd", 32, {"momentum": 0.0}),  # no moments at all
        ("adamw", 4, {"grafting": "adam"}),
        ("adamw", 32, {"grafting": "adam"}),
    ],
)
def test_a_skipped_member_leaves_the_rest_of_its_batch_alone(first_order, bits, extra):
    # three same-shape matrices, two vectors and a lone matrix are stepped as batches; some get a bad gradient
    g = torch.Generator().manual_seed(11)
    shapes = [(72, 64)] * 3 + [(5000,)] * 2 + [(50, 40)]
    start = [torch.randn(*s, generator=g) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in start]
    ref = [torch.nn.Parameter(x.clone()) for x in start]
    kw = dict(
        lr=1e-2,
        weight_decay=0.05,
        update_freq=1,
        root_freq=2,
        first_order=first_order,
        first_order_bits=bits,
        min_quant_numel=1024,
        first_order_min_quant_numel=1024,
        **extra,
    )
    opt, ref_opt = Q4Shampoo(ours, **kw), Q4Shampoo(ref, **kw)
    bad = {1, 4, 5}
    for t in range(1, 7):
        grads = [torch.randn(*s, generator=g) for s in shapes]
        for i, (p, r, grad) in enumerate(zip(ours, ref, grads)):
            p.grad = grad.clone()
            r.grad = None if (t == 3 and i in bad) else grad.clone()
            if t == 3 and i in bad:
                p.grad.view(-1)[7] = -float("inf")
                ref_opt.state[r]["step"] += 1
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, r, rtol=0, atol=0)
    assert opt.skipped_updates() == 3
    assert [int(opt.state[p]["skipped_updates"]) for p in ours] == [0, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("precond", ["cholesky_ef", "eigen", "fp32"])
@pytest.mark.parametrize("bits", [4, 32])
def test_huge_finite_gradients_give_finite_steps(precond, bits):
    # every entry ~1e18: the squares of a 96x80 gradient sum past fp32's range (its norm, 8.8e19, does not)
    g = torch.Generator().manual_seed(7)
    start = torch.randn(96, 80, generator=g)
    grads = [torch.randn(96, 80, generator=g) * torch.linspace(0.5, 1.0, 80) for _ in range(6)]
    moved = {}
    for scale in (1.0, 1e18):
        p = torch.nn.Parameter(start.clone())
        opt = Q4Shampoo([p], lr=1e-2, update_freq=1, root_freq=2, precond=precond, first_order_bits=bits)
        for grad in grads:
            p.grad = grad * scale
            opt.step()
        assert torch.isfinite(p).all() and opt.skipped_updates() == 0
        moved[scale] = p.detach() - start
    rel = float((moved[1e18] - moved[1.0]).norm() / moved[1.0].norm())
    print(f"{precond}, {bits}-bit moments: gradients x1e18 vs x1, relative difference of the displacement {rel:.1e}")
    # Shampoo with grafting and Adam is scale-invariant: fp32 statistics and moments follow to rounding; 4-bit
    # storage to its quantization noise (a different rounding flips codes; the bf16 block scales of x and of 1e18 x
    # round differently, 1e18 not being a power of two)
    assert rel < (1e-4 if precond == "fp32" and bits == 32 else 0.2)


def test_skip_counts_are_checkpointed():
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(40, 30, generator=g)) for _ in range(2)]
    opt = Q4Shampoo(params, lr=1e-2, update_freq=1, root_freq=2)
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = torch.randn(40, 30, generator=g)
            if i == 0 and t in (1, 3):
                p.grad[0, 0] = float("nan")
        opt.step()
    saved = _roundtrip(opt)
    assert [int(saved["state"][i]["skipped_updates"]) for i in range(2)] == [2, 0]
    again = Q4Shampoo(params, lr=1e-2, update_freq=1, root_freq=2)
    again.load_state_dict(saved)
    assert again.skipped_updates() == 2
    params[0].grad = torch.full((40, 30), float("inf"))
    params[1].grad = torch.randn(40, 30, generator=g)
    again.step()
    assert again.skipped_updates() == 3


# ------------------------------------------------------------------------------------------------
# Resuming and torch's optimizer conventions (issue 12)
# ------------------------------------------------------------------------------------------------


def _trained(params, steps=2, seed=3, **kw):
    g = torch.Generator().manual_seed(seed)
    opt = Q4Shampoo(params, lr=1e-2, update_freq=1, root_freq=2, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def _other_value(name):
    """A valid value different from the default, for any config field."""
    from hf_q4shampoo.config import _CHOICES

    default = getattr(Q4ShampooConfig(), name)
    if name in _CHOICES:
        return next(v for v in _CHOICES[name] if v != default)
    if isinstance(default, float):
        return default * 2
    return default + 1


@pytest.mark.parametrize("name", STATE_LAYOUT_KEYS)
def test_every_state_option_is_checked_at_load(name):
    # the list comes from the config's field metadata: a new option that shapes the state is covered here. The
    # shape-decided ones are refused where a parameter's state differs: a one-sided matrix for first_order_v, a
    # dimension that the two splits cut differently for block_split
    shape = {"first_order_v": (40, 700), "block_split": (1100, 100)}.get(name, (70, 40))
    params = [torch.nn.Parameter(torch.randn(*shape)) for _ in range(2)]
    saved = _roundtrip(_trained(params))
    other = Q4Shampoo(params, lr=1e-2, **{name: _other_value(name)})
    with pytest.raises(ConfigError, match=f"{name}: saved .*, now "):
        other.load_state_dict(saved)
    assert not other.state  # nothing was loaded


def test_quant_map_is_a_state_option_and_schedule_options_are_not():
    # a linear2 checkpoint read with the dynamic code decodes roots 6% and statistics 17% away (issue 12)
    assert "quant_map" in STATE_LAYOUT_KEYS and "first_order_min_quant_numel" in STATE_LAYOUT_KEYS
    params = [torch.nn.Parameter(torch.randn(70, 40))]
    saved = _roundtrip(_trained(params))
    with pytest.raises(ConfigError, match="quant_map: saved 'linear2', now 'dynamic'"):
        Q4Shampoo(params, quant_map="dynamic").load_state_dict(saved)
    Q4Shampoo(params, update_freq=7, root_freq=70, stat_decay=0.9).load_state_dict(saved)  # how it continues


def test_a_torch_adamw_state_dict_is_refused_with_what_to_do():
    params = [torch.nn.Parameter(torch.randn(70, 40)), torch.nn.Parameter(torch.randn(40))]
    adamw = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    adamw.step()
    opt = _trained(params)
    before = _state_tensors(opt, params[0])
    with pytest.raises(ConfigError) as info:
        opt.load_state_dict(adamw.state_dict())
    message = str(info.value)
    assert "not saved by Q4Shampoo" in message and "exp_avg" in message and "optimizer.pt" in message
    assert _changed(before, _state_tensors(opt, params[0])) == []


def test_load_checks_shapes_and_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(40, 70), torch.nn.Linear(70, 40))
    opt = _trained(list(model.parameters()))
    saved = _roundtrip(opt)
    # the same parameters in another order: the next step would fail deep inside without this check
    shuffled = [model[1].weight, model[1].bias, model[0].weight, model[0].bias]
    with pytest.raises(ConfigError, match=r"parameter #0 of group 0 \(shape \(40, 70\)\).*\(70, 40\)"):
        Q4Shampoo(shuffled, lr=1e-2).load_state_dict(saved)
    named = Q4Shampoo(
        [
            ("1.weight", model[1].weight),
            ("1.bias", model[1].bias),
            ("0.weight", model[0].weight),
            ("0.bias", model[0].bias),
        ],
        lr=1e-2,
    )
    with pytest.raises(ConfigError, match="parameter '1.weight'"):
        named.load_state_dict(saved)
    assert not named.state


def test_load_nontensor_step():
    # torch's optimizers accept a plain-number step (their older format); the next step must work
    params = [torch.nn.Parameter(torch.randn(70, 40)), torch.nn.Parameter(torch.randn(40))]
    opt = _trained(params)
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["step"] = int(state["step"])
    again = Q4Shampoo(params, lr=1e-2, update_freq=1, root_freq=2)
    again.load_state_dict(saved)
    for p in params:
        p.grad = torch.randn_like(p)
    again.step()
    assert [float(again.state[p]["step"]) for p in params] == [3.0, 3.0]
    assert again.state[params[0]]["step"].dtype == torch.float32


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_and_pickles_step_independently(how):
    import copy
    import pickle

    params = [torch.nn.Parameter(torch.randn(70, 40)), torch.nn.Parameter(torch.randn(40))]
    opt = _trained(params, steps=3)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in twin.__dict__ if not k.startswith("_")}
    assert twin.config == opt.config
    twin_params = twin.param_groups[0]["params"]
    before = [p.detach().clone() for p in params]
    state_before = _state_tensors(opt, params[0])
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, grad in zip(twin_params, grads):
        p.grad = grad.clone()
    twin.step()  # raised AttributeError ('config') before: torch's __setstate__ protocol
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # the original is untouched
    assert _changed(state_before, _state_tensors(opt, params[0])) == []
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    opt.step()
    for a, b in zip(params, twin_params):  # and both take the same step from the same state
        assert torch.equal(a, b)


def test_group_options_are_validated_like_the_constructor():
    import numpy as np

    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    for key, value in (("update_freq", 5), ("precond", "bogus")):
        with pytest.raises(ConfigError, match=f"'{key}' cannot be set per parameter group.*Per-group options: lr"):
            Q4Shampoo([{"params": [a], key: value}])
    opt = Q4Shampoo([a], lr=0.1)
    bad = [
        ({"lr": -1}, "lr must be"),
        ({"betas": (2.0, 0.9)}, "betas must be"),
        ({"weight_decay": "x"}, "weight_decay must be"),
        ({"lr": torch.tensor([0.1, 0.2])}, "one-element tensor"),
        ({"nesterov": True, "momentum": 0.0}, None),
    ]
    for options, message in bad[:-1]:
        with pytest.raises(ConfigError, match=message):
            opt.add_param_group({"params": [b], **options})
    assert len(opt.param_groups) == 1  # nothing was added
    sgd = Q4Shampoo([a], first_order="sgd")
    with pytest.raises(ConfigError, match="nesterov=True needs momentum > 0"):
        sgd.add_param_group({"params": [b], **bad[-1][0]})
    opt.add_param_group({"params": [b], "lr": np.float32(0.5), "betas": [np.float64(0.8), 0.9]})
    group = opt.param_groups[1]
    assert type(group["lr"]) is float and group["betas"] == (0.8, 0.9) and group["eps"] == 1e-8


def test_numpy_scalars_tensor_lr_and_config_argument():
    import numpy as np

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Q4Shampoo([p], lr=np.float32(1e-3), update_freq=np.int64(10), weight_decay=np.float64(0.1))
    assert opt.config.update_freq == 10 and type(opt.config.update_freq) is int
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"lr must be a number or a one-element tensor, got a tensor of shape \(2,\)"):
        Q4Shampoo([p], lr=torch.tensor([0.1, 0.2]))
    assert Q4Shampoo([p], config={"precond": "eigen", "update_freq": 4}).config.precond == "eigen"
    assert Q4Shampoo([p], config=Q4ShampooConfig(root_freq=7), root_freq=9).config.root_freq == 9
    with pytest.raises(ConfigError, match="unknown option.*'precondd'"):
        Q4Shampoo([p], config={"precondd": "eigen"})
    with pytest.raises(ConfigError, match="config must be a Q4ShampooConfig or a dict.*got str 'eigen'.*precond="):
        Q4Shampoo([p], config="eigen")


def test_large_vectors_are_not_mistaken_for_deepspeed_partitions(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    vec = torch.nn.Parameter(torch.randn(2**20))
    vec.grad = torch.randn(2**20)
    before = vec.detach().clone()
    Q4Shampoo([vec], lr=1e-2).step()  # a legitimate 1-D parameter of 2^20 entries (was refused)
    assert not torch.equal(before, vec)
    part = torch.nn.Parameter(torch.randn(1000))
    part.ds_id = 7  # what DeepSpeed ZeRO-3 sets on the parameters it partitions
    part.grad = torch.randn(1000)
    with pytest.raises(RuntimeError, match="flattened 1-D view"):
        Q4Shampoo([part]).step()


@pytest.mark.parametrize("first_order", ["adamw", "sgd"])
def test_maximize_is_minimizing_the_negated_gradient(first_order):
    g = torch.Generator().manual_seed(4)
    start = [torch.randn(60, 40, generator=g), torch.randn(40, generator=g)]
    up = [torch.nn.Parameter(x.clone()) for x in start]
    down = [torch.nn.Parameter(x.clone()) for x in start]
    kw = dict(lr=1e-2, weight_decay=0.1, update_freq=1, root_freq=2, first_order=first_order)
    opt_up, opt_down = Q4Shampoo(up, maximize=True, **kw), Q4Shampoo(down, **kw)
    assert opt_up.param_groups[0]["maximize"] is True
    for _ in range(4):
        grads = [torch.randn(x.shape, generator=g) for x in start]
        for p, q, grad in zip(up, down, grads):
            p.grad, q.grad = grad.clone(), -grad
        opt_up.step()
        opt_down.step()
    for p, q in zip(up, down):
        assert torch.equal(p, q)


# ---- grafting="adam" (Distributed Shampoo's Adam grafting) ----------------------------------------

GRAFT_SHAPES = [(40, 70), (8, 3, 3, 3), (300, 10), (70,), (1, 50, 1), (48, 20)]


def _fresh(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    grads = [
        [torch.randn(*s, generator=g) * torch.linspace(0.1, 3.0, s[-1]) * (0.5 + t % 3) for s in shapes]
        for t in range(13)
    ]
    return params, grads


@pytest.mark.parametrize("grafting,other_grafting", [("adam", "norm"), ("adam_filtered", "adam")])
def test_adam_grafting_matches_fp64_reference(grafting, other_grafting):
    # "adam": Shampoo's direction of G at the Adam step's norm, momentum after; "adam_filtered" (Distributed
    # Shampoo's order): Shampoo preconditions the momentum, each block at the norm of the AdamW step.
    # Blocks of 32 cut (40, 70) into 6 blocks of 3 region shapes; (300, 10) has a left side only; the 1-D and
    # (1, 50, 1) tensors take plain AdamW; roots at 4, 8, 12 (identity before: the Adam step itself)
    hyper = dict(
        lr=0.01,
        betas=(0.8, 0.99),
        eps=1e-8,
        weight_decay=0.1,
        stat_decay=0.9,
        matrix_eps=1e-4,
        update_freq=2,
        root_freq=4,
        max_precond_dim=32,
    )
    exact = dict(precond="fp32", first_order_bits=32, root_method="eigh", refresh_spread=1, **hyper)
    params, grads = _fresh(GRAFT_SHAPES, seed=int(torch.randint(0, 10**6, ())))
    start = [p.detach().double().clone() for p in params]
    ref = ReferenceShampoo(params, grafting=grafting, **hyper)
    opt = Q4Shampoo(params, grafting=grafting, **exact)
    worst = 0.0
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        ref.step(step_grads)
        for p, r, p0 in zip(params, ref.params, start):
            worst = max(worst, float((p.detach().double() - r).norm() / (r - p0).norm()))
    print(f"{grafting} grafting: worst relative error of the displacement vs fp64, 13 steps: {worst:.2e}")
    assert worst < 2e-4
    # the same run with the nearest other grafting moves the matrices elsewhere (the option is not silently ignored)
    other = [torch.nn.Parameter(p0.float()) for p0 in start]
    _train(lambda ps: Q4Shampoo(ps, grafting=other_grafting, **exact), other, grads)
    assert float((other[0].detach().double() - ref.params[0]).norm() / (ref.params[0] - start[0]).norm()) > 0.05


@pytest.mark.parametrize("precond", ["fp32", "cholesky_ef"])
@pytest.mark.parametrize("grafting", ["adam", "adam_filtered"])
def test_adam_grafted_update_has_the_adam_steps_norm(grafting, precond):
    # No decay: the update is lr * the grafted direction. Per block, its norm must be that of the Adam step
    # A = m^ / (sqrt(v^) + eps) computed here in fp64 ("adam": beta1 = 0 here, so m^ = g; "adam_filtered": the
    # bias-corrected momentum); before a member's first root it is A itself. Four same-shape matrices with
    # spread root offsets: their batch mixes ready and not-ready members.
    shapes = [(40, 70)] * 4 + [(30,)]
    params, grads = _fresh(shapes, seed=int(torch.randint(0, 10**6, ())))
    for p in params:  # small parameters: their fp32 rounding stays far below the tolerance of the displacement
        p.data.zero_()
    lr, b1, b2, eps = 0.01, (0.0 if grafting == "adam" else 0.9), 0.99, 1e-8
    opt = Q4Shampoo(
        params,
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        precond=precond,
        grafting=grafting,
        first_order_bits=32,
        update_freq=1,
        root_freq=4,
        first_root_step=0,  # first roots at 4 + offset, as the check below expects
        refresh_spread=4,
        max_precond_dim=32,
    )
    m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    v = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    mixed = False
    for t, step_grads in enumerate(grads, 1):
        before = [p.detach().double().clone() for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        ready = []
        for i, (p, g) in enumerate(zip(params, step_grads)):
            m[i] = b1 * m[i] + (1 - b1) * g.double()
            v[i] = b2 * v[i] + (1 - b2) * g.double() ** 2
            adam = m[i] / (1 - b1**t) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            direction = (before[i] - p.detach().double()) / lr
            if len(shapes[i]) == 1:
                torch.testing.assert_close(direction, adam, rtol=1e-4, atol=1e-5)  # plain AdamW
                continue
            offset = int(opt.state[p]["root_offset"])
            ready.append(t >= offset + 4)
            if not ready[-1]:
                torch.testing.assert_close(direction, adam, rtol=1e-4, atol=1e-5)
                continue
            for r0 in range(0, 40, 32):
                for c0 in range(0, 70, 32):
                    blk = (slice(r0, r0 + 32), slice(c0, c0 + 32))
                    ratio = float(direction[blk].norm() / adam[blk].norm())
                    assert abs(ratio - 1) < 1e-4, (t, i, r0, c0, ratio)
            assert not torch.allclose(direction, adam, rtol=1e-2)  # it is Shampoo's direction, at A's norm
        mixed |= any(ready) and not all(ready)
    assert mixed  # the partial-batch path ran


@pytest.mark.parametrize(
    "grafting,precond,bits",
    [("adam", "cholesky_ef", 4), ("adam", "fp32", 32), ("adam", "eigen", 4)]
    + [("adam_filtered", "cholesky_ef", 4), ("adam_filtered", "fp32", 32)],
)
def test_adam_grafting_exact_resume(grafting, precond, bits):
    kw = dict(
        lr=0.01,
        weight_decay=0.05,
        precond=precond,
        grafting=grafting,
        first_order_bits=bits,
        update_freq=2,
        root_freq=3,
        max_precond_dim=64,
        min_quant_numel=256,
        first_order_min_quant_numel=256,
    )
    params, grads = _fresh(GRAFT_SHAPES, seed=3 if grafting == "adam" else 5)
    start = [p.detach().clone() for p in params]
    straight = [torch.nn.Parameter(x.clone()) for x in start]
    _train(lambda p: Q4Shampoo(p, **kw), straight, grads)
    first = [torch.nn.Parameter(x.clone()) for x in start]
    saved = _roundtrip(_train(lambda p: Q4Shampoo(p, **kw), first, grads[:5]))
    assert saved["q4shampoo_config"]["grafting"] == grafting
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = Q4Shampoo(resumed, **kw)
    opt.load_state_dict(saved)
    if bits == 4:
        assert any(v.dtype == torch.uint8 for v in opt.state[resumed[0]].values() if isinstance(v, torch.Tensor))
    for step_grads in grads[5:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), "resumed run must be bitwise identical on CPU"
    # the state has AdamW's keys and shapes but another meaning: a checkpoint of another grafting is refused
    for other in sorted({"norm", "adam", "adam_filtered"} - {grafting}):
        with pytest.raises(ConfigError, match=f"grafting: saved '{grafting}', now '{other}'"):
            Q4Shampoo([torch.nn.Parameter(x.clone()) for x in start], **{**kw, "grafting": other}).load_state_dict(
                saved
            )
    legacy = dict(saved, q4shampoo_config={k: v for k, v in saved["q4shampoo_config"].items() if k != "grafting"})
    with pytest.raises(ConfigError, match=f"grafting: saved 'norm', now '{grafting}'"):  # saved before the option
        Q4Shampoo([torch.nn.Parameter(x.clone()) for x in start], **kw).load_state_dict(legacy)


@pytest.mark.parametrize("grafting", ["adam", "adam_filtered"])
def test_adam_grafting_maximize_is_descent_on_the_negated_gradient(grafting):
    params, grads = _fresh([(40, 70), (70,)], seed=9)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.01, precond="fp32", grafting=grafting, update_freq=1, root_freq=2)
    up, down = Q4Shampoo(params, maximize=True, **kw), Q4Shampoo(twin, **kw)
    for step_grads in grads[:6]:
        for p, q, g in zip(params, twin, step_grads):
            p.grad, q.grad = g.clone(), -g
        up.step()
        down.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("grafting", ["adam", "adam_filtered"])
def test_adam_grafting_skips_a_member_whose_direction_is_not_finite(grafting):
    # a bad preconditioned direction (not a bad gradient) must skip that member's m, v and value only
    params, grads = _fresh([(40, 70)] * 2, seed=4)
    opt = Q4Shampoo(params, lr=0.01, precond="fp32", grafting=grafting, update_freq=1, root_freq=2, refresh_spread=1)
    _train(lambda p: opt, params, grads[:2])
    bucket = opt._current_layout().groups[0].slots[0].bucket
    rows = opt._current_layout().groups[0].slots[0].member_rows(1)
    root_key = next(k for k in bucket.storage if k.startswith("root"))
    bucket.storage[root_key][rows.start].fill_(float("nan"))
    before = [_state_tensors(opt, p) for p in params]
    for p, g in zip(params, grads[2]):
        p.grad = g.clone()
    opt.step()  # step 3: no root refresh, so the NaN root is used (the statistics take the finite gradient)
    kept = ["param", "state.exp_avg", "state.exp_avg_sq"]
    assert [k for k in _changed(before[1], _state_tensors(opt, params[1])) if k in kept] == []
    assert [k for k in _changed(before[0], _state_tensors(opt, params[0])) if k in kept] == kept
    assert torch.isfinite(params[1]).all()
    assert [int(opt.state[p]["skipped_updates"]) for p in params] == [0, 1]


def test_as_slice_takes_consecutive_rows_only():
    from hf_q4shampoo.layout import as_slice

    assert as_slice([3, 4, 5]) == slice(3, 6) and as_slice([0]) == slice(0, 1)
    assert as_slice([3, 5]) is None and as_slice([5, 4]) is None


@pytest.mark.parametrize("old_dtype", [torch.bfloat16, torch.float32])
def test_checkpoint_with_older_block_scales_loads_with_one_byte_scales(old_dtype):
    # checkpoints from before the block scales took one byte (2026-12-02) hold bf16 scales, and those from before
    # 2026-12-01 fp32 ones: they load with each scale at its nearest grid point (within 2.2%), the layout every
    # later step writes, and training goes on
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Linear(80, 96))
    opt = Q4Shampoo(model.parameters(), update_freq=1, root_freq=2)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    found = []
    old_scale_format(saved["state"], old_dtype, found)
    assert any("root_scales" in k for k in found) and any("exp_avg_scales" in k for k in found)
    assert any("factor_diag_block_upper_scale" in k for k in found)
    again = Q4Shampoo(model.parameters(), update_freq=1, root_freq=2)
    again.load_state_dict(saved)
    # the same statistics and roots as before the round trip, and the caller's state dict left as it was
    form = again._form(torch.device("cpu"))
    assert saved["state"][0]["exp_avg_scales"].dtype == old_dtype and "exp_avg_scale_exp" not in saved["state"][0]
    for p in (model[0].weight, model[1].weight):
        state, before = again.state[p], opt.state[p]
        assert state["exp_avg_scales"].dtype == torch.uint8 and state["exp_avg_scale_exp"].shape == ()
        region, old = state["regions"][0]["R"], before["regions"][0]["R"]
        assert region["root_scales"].dtype == torch.uint8 and region["factor_scales"].dtype == torch.uint8
        for key in (
            "root_scales",
            "factor_scales",
            "factor_diag_block_upper_scale",
            "factor_scale_exp",
            "root_diag",
            "root_diag_scale",
        ):
            assert torch.equal(region[key], old[key]), key  # grid values go back to the same bytes
        for key in ("exp_avg_sq_max0", "exp_avg_sq_max1"):
            assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], before[key]), key
        torch.testing.assert_close(form.statistics(region), form.statistics(old), rtol=0, atol=0)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        again.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert again.state[model[0].weight]["exp_avg_scales"].dtype == torch.uint8


def test_eight_bit_roots_skip_a_bad_step_and_resume_exactly():
    # root_bits=8 adds the roots' second code (root_res_*): a non-finite gradient on a root step must leave it as
    # it was, and a checkpoint must carry it (a resume without it would decode 4-bit roots)
    g = torch.Generator().manual_seed(13)
    start = torch.randn(96, 80, generator=g)
    grads = [torch.randn(96, 80, generator=g) * torch.linspace(0.1, 3, 80) for _ in range(7)]
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    kw = dict(lr=1e-2, update_freq=1, root_freq=2, root_bits=8)
    opt = Q4Shampoo([p], **kw)
    for t, grad in enumerate(grads[:4], 1):
        p.grad = grad.clone()
        if t == 4:  # a statistics + root step
            before = _state_tensors(opt, p)
            p.grad[2, 3] = float("nan")
            opt.step()
            assert _changed(before, _state_tensors(opt, p)) == []
            continue
        opt.step()
    side = opt.state[p]["regions"][0]["L"]
    assert {"root_res_codes", "root_res_scales"} <= set(side)
    assert int(side["root_res_codes"].count_nonzero()) > 0  # the second code holds something after a refresh
    with torch.no_grad():
        q.copy_(p)
    resumed = Q4Shampoo([q], **kw)
    resumed.load_state_dict(_roundtrip(opt))
    for grad in grads[4:]:
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(q, p, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="root_bits: saved 8, now 4"):
        Q4Shampoo([q], lr=1e-2).load_state_dict(_roundtrip(opt))


def test_a_checkpoint_with_other_m_blocks_is_refused_naming_the_option_and_resumes_with_it():
    # first_order_m_block decides the moments' layout: a checkpoint of paper 3's blocks of 128 (every checkpoint from
    # before the option, 2026-12-02) is refused by the default 256 with a message naming the option, and loads
    # when it is passed; its steps keep blocks of 128
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(96, 80))]
    old = Q4Shampoo(params, update_freq=1, root_freq=2, first_order_m_block=128)
    for _ in range(2):
        params[0].grad = torch.randn_like(params[0])
        old.step()
    saved = copy.deepcopy(old.state_dict())
    assert old.state[params[0]]["exp_avg_scales"].shape[-1] == 96 * 80 // 128
    legacy = dict(
        saved, q4shampoo_config={k: v for k, v in saved["q4shampoo_config"].items() if k != "first_order_m_block"}
    )
    for state_dict in (saved, legacy):
        with pytest.raises(ConfigError, match="first_order_m_block: saved 128, now 256"):
            Q4Shampoo(params, update_freq=1, root_freq=2).load_state_dict(state_dict)
    again = Q4Shampoo(params, update_freq=1, root_freq=2, first_order_m_block=128)
    again.load_state_dict(legacy)
    params[0].grad = torch.randn_like(params[0])
    again.step()
    assert again.state[params[0]]["exp_avg_scales"].shape[-1] == 96 * 80 // 128 and torch.isfinite(params[0]).all()
