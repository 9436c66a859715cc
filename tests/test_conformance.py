"""PyTorch's optimizer conventions, checked for Q4Shampoo (issue 12).

Our own port of what ``test/test_optim.py`` in PyTorch checks for every optimizer declared through an
``OptimizerInfo``: state_dict round trips (also through ``torch.load(weights_only=True)``), loading into a
fresh optimizer, deep copies, ``step(closure)``, ``zero_grad``, parameter groups with their own options,
parameters without gradients, complex and sparse refusal, bf16 parameters and a dtype change at resume,
``add_param_group``, tensor learning rates, ``maximize``, hooks, errors, and that a step goes downhill.

Every check runs for each preconditioner form with 4-bit and fp32 first-order moments, and once with SGD
(Nesterov). The model is tiny but every path is taken: ``min_precond_numel``/``min_quant_numel`` put all
matrices through Shampoo with 4-bit factors, ``first_order_min_quant_numel`` puts the matrices' moments in
4 bit, the biases keep fp32 moments, and ``update_freq=1, root_freq=2`` computes roots from step 2 on.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from hf_q4shampoo import ConfigError, Q4Shampoo
from hf_q4shampoo.config import PRECOND_FORMS

SMALL = dict(
    update_freq=1,
    root_freq=2,
    min_precond_numel=16,
    min_quant_numel=16,
    first_order_min_quant_numel=32,
    max_precond_dim=64,
)
CONFIGS = {
    f"{form}-{bits}bit": dict(precond=form, first_order_bits=bits, **SMALL)
    for form in PRECOND_FORMS
    for bits in (4, 32)
}
CONFIGS["cholesky_ef-sgd-nesterov"] = dict(
    precond="cholesky_ef", first_order="sgd", momentum=0.9, nesterov=True, **SMALL
)
STEPS = 5  # roots at steps 2 and 4: the preconditioned path is exercised after a refresh


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def options(request) -> dict:
    return dict(CONFIGS[request.param])


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6)).to(dtype)


def _data(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 12, generator=g).to(dtype), torch.randn(32, 6, generator=g).to(dtype)


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    x, y = _data(seed, next(model.parameters()).dtype)
    return ((model(x) - y).float() ** 2).mean()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, seeds: range) -> list[float]:
    losses = []
    for seed in seeds:
        opt.zero_grad()
        loss = _loss(model, seed)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _same_tree(a, b) -> bool:
    """Equal nested state (tensors bitwise, dtypes included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- state dict ------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_continue(options):
    straight, resumed = _model(), _model()
    opt = Q4Shampoo(straight.parameters(), lr=1e-2, **options)
    _train(straight, opt, range(STEPS))
    saved = _roundtrip(opt.state_dict())  # weights_only: only tensors and plain Python values
    resumed.load_state_dict(straight.state_dict())
    again = Q4Shampoo(resumed.parameters(), lr=1e-2, **options)
    again.load_state_dict(saved)
    assert _same_tree(again.state_dict(), opt.state_dict())
    _train(straight, opt, range(STEPS, STEPS + 3))
    _train(resumed, again, range(STEPS, STEPS + 3))
    assert _same_params(straight, resumed)  # bitwise on CPU
    assert _same_tree(again.state_dict()["state"], opt.state_dict()["state"])


def test_load_into_a_fresh_optimizer_keeps_dtypes_and_groups(options):
    model = _model()
    opt = Q4Shampoo(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}], lr=1e-2, **options
    )
    _train(model, opt, range(STEPS))
    fresh = Q4Shampoo([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.5, **options)
    fresh.load_state_dict(opt.state_dict())
    assert [g["lr"] for g in fresh.param_groups] == [1e-2, 3e-3]  # the saved hyper-parameters win
    dtypes = {t.dtype for s in fresh.state.values() for t in _tensors(s)}
    assert torch.uint8 in dtypes or options["precond"] == "fp32"  # 4-bit codes stay codes
    mine, saved = fresh.state_dict(), opt.state_dict()
    assert _same_tree(mine["state"], saved["state"]) and _same_tree(mine["param_groups"], saved["param_groups"])


def _tensors(value):
    return (t for _, t in _named_tensors(value))


def _named_tensors(value, key=""):
    """(key, tensor) of every tensor in a state, the key being the dict key that holds it."""
    if isinstance(value, torch.Tensor):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _named_tensors(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _named_tensors(v, key)


def test_named_parameters_round_trip(options):
    model = _model()
    opt = Q4Shampoo(model.named_parameters(), lr=1e-2, **options)
    _train(model, opt, range(3))
    saved = _roundtrip(opt.state_dict())
    assert saved["param_groups"][0]["param_names"] == [name for name, _ in model.named_parameters()]
    again = Q4Shampoo(model.named_parameters(), lr=1e-2, **options)
    again.load_state_dict(saved)
    assert _same_tree(again.state_dict()["state"], opt.state_dict()["state"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_another_device(options):
    cpu_model = _model()
    opt = Q4Shampoo(cpu_model.parameters(), lr=1e-2, **options)
    _train(cpu_model, opt, range(STEPS))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    gpu_opt = Q4Shampoo(gpu_model.parameters(), lr=1e-2, **options, apply_dtype="float32", use_compile=False)
    gpu_opt.load_state_dict(_roundtrip(opt.state_dict()))
    state = gpu_opt.state[gpu_model[0].weight]
    assert state["step"].device.type == "cpu"  # read by the host every step
    assert all(t.device.type == "cuda" for k, t in _named(state) if k != "step")
    for seed in range(STEPS, STEPS + 2):
        gpu_opt.zero_grad()
        x, y = (t.cuda() for t in _data(seed))
        ((gpu_model(x) - y) ** 2).mean().backward()
        gpu_opt.step()
    assert all(torch.isfinite(p).all() for p in gpu_model.parameters())


def test_load_nontensor_step(options):
    model = _model()
    opt = Q4Shampoo(model.parameters(), lr=1e-2, **options)
    _train(model, opt, range(3))
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["step"] = float(state["step"])  # torch's older format
    again = Q4Shampoo(model.parameters(), lr=1e-2, **options)
    again.load_state_dict(saved)
    _train(model, again, range(3, 5))
    assert all(float(s["step"]) == 5.0 for s in again.state.values())


def test_deepcopy_copies_public_attributes_and_steps_alike(options):
    model = _model()
    opt = Q4Shampoo(model.parameters(), lr=1e-2, **options)
    _train(model, opt, range(3))
    twin_model = copy.deepcopy(model)
    twin = Q4Shampoo(twin_model.parameters(), lr=1e-2, **options)
    twin.load_state_dict(copy.deepcopy(opt).state_dict())
    clone = copy.deepcopy(opt)
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in clone.__dict__ if not k.startswith("_")} and clone.config == opt.config
    assert _same_tree(clone.state_dict(), opt.state_dict())
    _train(model, opt, range(3, 5))
    _train(twin_model, twin, range(3, 5))
    assert _same_params(model, twin_model)


def test_hooks_run_around_step_and_state_dict(options):
    model = _model()
    opt = Q4Shampoo(model.parameters(), lr=1e-2, **options)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("state_dict") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load") or sd)
    _train(model, opt, range(1))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "state_dict", "load"]


# ---- step ----------------------------------------------------------------------------------------------


def test_step_with_closure_equals_step_after_backward(options):
    a, b = _model(), _model()
    opt_a = Q4Shampoo(a.parameters(), lr=1e-2, **options)
    opt_b = Q4Shampoo(b.parameters(), lr=1e-2, **options)
    calls = []
    for seed in range(STEPS):

        def closure(seed=seed):
            calls.append(seed)
            opt_a.zero_grad()
            loss = _loss(a, seed)
            loss.backward()
            return loss

        returned = opt_a.step(closure)
        opt_b.zero_grad()
        expected = _loss(b, seed)
        expected.backward()
        opt_b.step()
        assert torch.equal(returned.detach(), expected.detach())
    assert calls == list(range(STEPS))  # called once per step
    assert _same_params(a, b)


def test_zero_grad(options):
    model = _model()
    opt = Q4Shampoo(model.parameters(), lr=1e-2, **options)
    _loss(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    _loss(model, 1).backward()
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())


def test_goes_downhill(options):
    model = _model()
    lr = 0.1 if options.get("first_order") == "sgd" else 3e-2  # SGD's step is the grafted gradient itself
    opt = Q4Shampoo(model.parameters(), lr=lr, **options)
    losses = [_loss(model, 0).item()]
    for _ in range(12):
        opt.zero_grad()
        loss = _loss(model, 0)  # one fixed batch: a deterministic objective
        loss.backward()
        opt.step()
    losses.append(_loss(model, 0).item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_param_groups_with_their_own_options(options):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    groups = [
        {"params": [model[0].weight], "lr": 2e-2, "weight_decay": 0.1},
        {"params": [model[0].bias]},
        {"params": list(model[2].parameters()), "lr": 0.0},  # a frozen group: lr 0 and no decay moves nothing
    ]
    opt = Q4Shampoo(groups, lr=1e-2, **options)
    _train(model, opt, range(STEPS))
    after = list(model.parameters())
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["lr"] == 1e-2
    assert opt.state[model[2].weight]["step"] == STEPS  # stepped (state kept), just not moved


def test_params_without_grad_are_left_alone(options):
    model = _model()
    extra = torch.nn.Parameter(torch.randn(10, 12))  # in the optimizer, never in the graph
    frozen = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    opt = Q4Shampoo([*model.parameters(), extra, frozen], lr=1e-2, **options)
    start = extra.detach().clone(), frozen.detach().clone()
    _train(model, opt, range(3))
    assert torch.equal(extra, start[0]) and torch.equal(frozen, start[1])
    assert extra not in opt.state and frozen not in opt.state
    assert opt.step() is None  # no gradients at all (zero_grad set them to None): a no-op


def test_complex_and_sparse_are_refused(options):
    c = torch.nn.Parameter(torch.randn(6, 6, dtype=torch.complex64))
    c.grad = torch.randn(6, 6, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex.*view_as_real"):
        Q4Shampoo([c], **options).step()
    emb = torch.nn.Embedding(20, 8, sparse=True)
    emb(torch.tensor([1, 5])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*SparseAdam"):
        Q4Shampoo(emb.parameters(), **options).step()


def test_bf16_parameters_and_a_dtype_change_at_resume(options):
    model = _model(dtype=torch.bfloat16)
    opt = Q4Shampoo(model.parameters(), lr=1e-2, **options)
    losses = _train(model, opt, range(STEPS))
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    # statistics and moments stay fp32 / 4-bit whatever the parameters' dtype; block scales take one byte (with an
    # int32 exponent per matrix), except the eigen and naive forms' (bf16); v's rank-1 maxima are bf16 and the
    # roots' diagonals fp16 (over an fp32 scale)
    named = [(k, t.dtype) for s in opt.state.values() for k, t in _named_tensors(s)]
    bf16_keys = {k for k, d in named if d == torch.bfloat16 and not k.endswith("_scales")}
    assert all(k.startswith("exp_avg_sq_max") for k in bf16_keys), bf16_keys
    assert {k for k, d in named if d == torch.float16} <= {"root_diag"}
    assert {d for k, d in named} <= {
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.uint8,
        torch.int64,
        torch.int32,
    }
    bf16_scales = {k for k, d in named if k.endswith("_scales") and d == torch.bfloat16}
    assert bf16_scales <= {"eigvecs_t_scales", "stats_scales"}, bf16_scales
    # an fp32 run resumed with its parameters cast to bf16 (e.g. a model loaded in another dtype)
    fp32 = _model()
    opt32 = Q4Shampoo(fp32.parameters(), lr=1e-2, **options)
    _train(fp32, opt32, range(STEPS))
    saved = _roundtrip(opt32.state_dict())
    cast = copy.deepcopy(fp32).to(torch.bfloat16)
    resumed = Q4Shampoo(cast.parameters(), lr=1e-2, **options)
    resumed.load_state_dict(saved)
    dtypes = {k: t.dtype for k, t in _named(opt32.state[fp32[0].weight])}
    assert {k: t.dtype for k, t in _named(resumed.state[cast[0].weight])} == dtypes  # not cast to bf16
    more = _train(cast, resumed, range(STEPS, STEPS + 3))
    assert all(torch.isfinite(p).all() for p in cast.parameters()) and all(x == x for x in losses + more)


def _named(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, list):
            for i, sides in enumerate(value):
                yield from _named(sides, f"{prefix}{key}[{i}].")
        elif isinstance(value, dict):
            yield from _named(value, f"{prefix}{key}.")


def test_add_param_group(options):
    model = _model()
    opt = Q4Shampoo(model[0].parameters(), lr=1e-2, **options)
    _train(model, opt, range(2))
    before = [p.detach().clone() for p in model[2].parameters()]
    with pytest.raises(ConfigError, match="lr must be"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 5e-3})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["betas"] == opt.param_groups[0]["betas"]
    _train(model, opt, range(2, STEPS))
    assert all(not torch.equal(a, b) for a, b in zip(before, model[2].parameters()))
    assert int(opt.state[model[2].weight]["step"]) == STEPS - 2


def test_tensor_lr_matches_float_lr(options):
    a, b = _model(), _model()
    opt_a = Q4Shampoo(a.parameters(), lr=1e-2, **options)
    opt_b = Q4Shampoo(b.parameters(), lr=torch.tensor(1e-2), **options)
    assert isinstance(opt_b.param_groups[0]["lr"], torch.Tensor)
    _train(a, opt_a, range(STEPS))
    _train(b, opt_b, range(STEPS))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="lr must be a number or a one-element tensor"):
        Q4Shampoo(a.parameters(), lr=torch.tensor([1e-2, 2e-2]), **options)


def test_maximize(options):
    up, down = _model(), _model()
    opt_up = Q4Shampoo(up.parameters(), lr=1e-2, maximize=True, **options)
    opt_down = Q4Shampoo(down.parameters(), lr=1e-2, **options)
    for seed in range(STEPS):
        opt_up.zero_grad()
        opt_down.zero_grad()
        _loss(up, seed).backward()
        (-_loss(down, seed)).backward()
        opt_up.step()
        opt_down.step()
    assert _same_params(up, down)  # ascending f is descending -f


def test_errors_name_the_option(options):
    params = list(_model().parameters())
    for bad, message in (
        ({"lr": -1e-3}, "lr must be"),
        ({"betas": (1.0, 0.9)}, "betas must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
        ({"foreach": True}, "unknown option.*'foreach'"),
    ):
        with pytest.raises(ConfigError, match=message):
            Q4Shampoo(params, **{**options, **bad})
    assert "Q4Shampoo" in repr(Q4Shampoo(params, **options))
