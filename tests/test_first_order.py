"""first_order.py: the batched AdamW / SGD-momentum steps against an fp64 reference, fp32 and 4-bit moments."""

import math

import pytest
import torch

from hf_q4shampoo.first_order import adamw_batch_step, sgd_batch_step
from hf_q4shampoo.moments import (
    QUANT_MIN_NUMEL,
    first_order_keys,
    init_first_order_state,
    is_thin,
    quantized_moments,
)

SHAPE_FP32 = (24, 16)  # 384 entries: moments stay fp32 whatever the bits
SHAPE_4BIT = (96, 64)  # 6144 entries: 4-bit moments (m block-128 dynamic exponent, v rank-1)
STEPS = 6


def _batch(shape, k, kind, bits, dtype=torch.float32, seed=0):
    """K parameters of one shape, their stacked moments (as layout.py stacks them) and a fixed direction stream."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).to(dtype) for _ in range(k)]
    states = [init_first_order_state(p, kind, bits) for p in params]
    moments = {key: torch.stack([s[key] for s in states]) for key in states[0]}
    directions = [torch.randn(k, *shape, generator=gen) * (0.5 + i) for i in range(STEPS)]
    return params, moments, directions


def _adamw_reference(params, directions, lr, betas, eps, weight_decay):
    """fp64 AdamW with decoupled decay and bias correction (paper 2's ShampooAdamW)."""
    beta1, beta2 = betas
    p = torch.stack(params).double()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, d in enumerate(directions, start=1):
        d = d.double()
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * d
        v = beta2 * v + (1 - beta2) * d * d
        p = p - lr * (m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    return p


def _sgd_reference(params, directions, lr, momentum, nesterov, weight_decay):
    """fp64 SGD with L2 added to the direction, then momentum (or Nesterov)."""
    p = torch.stack(params).double()
    buf = torch.zeros_like(p)
    for d in directions:
        d = d.double() + weight_decay * p
        if not momentum:
            p = p - lr * d
            continue
        buf = momentum * buf + d
        p = p - lr * (d + momentum * buf if nesterov else buf)
    return p


def _run_adamw(params, moments, directions, bits, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1):
    for t, d in enumerate(directions, start=1):
        adamw_batch_step(params, d, moments, step=t, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits)
    return torch.stack(params).double()


def _relative(got, ref, start):
    """Distance from the reference, relative to how far the reference moved."""
    return float((got - ref).norm() / (ref - start).norm())


def test_quantized_moments_threshold_and_state_keys():
    assert not quantized_moments(QUANT_MIN_NUMEL, 4) and quantized_moments(QUANT_MIN_NUMEL + 1, 4)
    # thin: a side of the matrix view (first dim against the rest) at most min_quant_dim; 0 turns it off
    assert is_thin((8, 576), 16) and is_thin((576, 8), 16) and is_thin((4, 2, 6, 96), 16)
    assert not is_thin((64, 576), 16) and not is_thin((8, 576), 0) and not is_thin((5000,), 16)
    thin = init_first_order_state(torch.zeros(8, 576), "adamw", 4, v="factored", min_quant_dim=16)
    assert set(thin) == {"exp_avg", "exp_avg_sq"}  # plain fp32 m and v, not codes nor factors
    assert not quantized_moments(10**6, 32)
    small = init_first_order_state(torch.zeros(SHAPE_FP32), "adamw", 4)
    assert sorted(small) == ["exp_avg", "exp_avg_sq"] and small["exp_avg"].dtype == torch.float32
    big = init_first_order_state(torch.zeros(SHAPE_4BIT), "adamw", 4)
    assert big["exp_avg_codes"].dtype == torch.uint8 and any(k.startswith("exp_avg_sq_max") for k in big)
    sgd = init_first_order_state(torch.zeros(SHAPE_4BIT), "sgd", 4)
    assert first_order_keys(sgd) == list(sgd) and all(k.startswith("momentum_buffer") for k in sgd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_fp32_moments_match_fp64(dtype):
    # fp32 parameters take torch's fused AdamW kernel, bf16 parameters the pure-torch math
    params, moments, directions = _batch(SHAPE_4BIT, 3, "adamw", 32, dtype)
    start = torch.stack(params).double()
    ref = _adamw_reference(params, directions, 1e-2, (0.9, 0.99), 1e-8, 0.1)
    got = _run_adamw(params, moments, directions, bits=32)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert _relative(got, ref, start) < 1e-5
    else:  # bf16 parameters round at every decay and update: a few of bf16's steps (2^-8 relative) over 6 steps
        assert (got - ref).abs().max() < 4 * 2**-8 * ref.abs().max()


def test_adamw_small_tensors_stay_exact_with_4bit_requested():
    params, moments, directions = _batch(SHAPE_FP32, 2, "adamw", 4)
    ref = _adamw_reference(params, directions, 1e-2, (0.9, 0.99), 1e-8, 0.1)
    torch.testing.assert_close(_run_adamw(params, moments, directions, bits=4), ref, rtol=1e-5, atol=1e-6)


def test_adamw_4bit_moments_follow_fp64_within_quantization_error():
    params, moments, directions = _batch(SHAPE_4BIT, 3, "adamw", 4)
    start = torch.stack(params).double()
    ref = _adamw_reference(params, directions, 1e-2, (0.9, 0.99), 1e-8, 0.1)
    got = _run_adamw(params, moments, directions, bits=4)
    rel = _relative(got, ref, start)
    # 4-bit moments differ from exact ones (~11% of the distance moved here), but only by their quantization error:
    # moments lost or decoded wrongly would put the parameters about as far from the reference as they moved
    assert 1e-4 < rel < 0.25, rel
    assert moments["exp_avg_codes"].dtype == torch.uint8


@pytest.mark.parametrize("bits", [32, 4])
def test_a_batch_steps_each_member_as_if_alone(bits):
    params, moments, directions = _batch(SHAPE_4BIT, 3, "adamw", bits)
    alone = []
    for i in range(3):
        p = [params[i].clone()]
        m = {k: v[i : i + 1].clone() for k, v in moments.items()}
        alone.append(_run_adamw(p, m, [d[i : i + 1] for d in directions], bits)[0])
    together = _run_adamw(params, moments, directions, bits)
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-6, atol=1e-7)


def test_adamw_accepts_a_tensor_learning_rate():
    params, moments, directions = _batch(SHAPE_4BIT, 2, "adamw", 4)
    twin_params, twin_moments, _ = _batch(SHAPE_4BIT, 2, "adamw", 4)
    got = _run_adamw(params, moments, directions, bits=4, lr=torch.tensor(1e-2))
    torch.testing.assert_close(got, _run_adamw(twin_params, twin_moments, directions, bits=4, lr=1e-2))


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, False), (0.9, True), (0.0, False)])
def test_sgd_fp32_momentum_matches_fp64(momentum, nesterov):
    params, moments, directions = _batch(SHAPE_4BIT, 2, "sgd", 32)
    ref = _sgd_reference(params, directions, 1e-2, momentum, nesterov, 0.05)
    for d in directions:
        sgd_batch_step(params, d, moments, lr=1e-2, momentum=momentum, nesterov=nesterov, weight_decay=0.05, bits=32)
    torch.testing.assert_close(torch.stack(params).double(), ref, rtol=1e-5, atol=1e-6)


def test_sgd_4bit_momentum_follows_fp64_within_quantization_error():
    params, moments, directions = _batch(SHAPE_4BIT, 2, "sgd", 4)
    start = torch.stack(params).double()
    ref = _sgd_reference(params, directions, 1e-2, 0.9, False, 0.05)
    for d in directions:
        sgd_batch_step(params, d, moments, lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.05, bits=4)
    rel = _relative(torch.stack(params).double(), ref, start)
    assert 1e-4 < rel < 0.25, rel  # ~11% here (see the AdamW test)
    assert moments["momentum_buffer_codes"].dtype == torch.uint8


def test_device_scalars_refill_only_on_a_new_value():
    """The step's 0-dim scalars: asking again for the value held returns the buffer without a fill (no kernel
    launch on an accelerator); a new value refills it in place, and alternating values stay right."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hf_q4shampoo.first_order import _DeviceScalars

    class Fills(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket is torch.ops.aten.fill_
            return func(*args, **(kwargs or {}))

    scalars, device = _DeviceScalars(), torch.device("cpu")
    fills = Fills()
    with fills:
        first = scalars(device, "lr", 3e-4)
        again = scalars(device, "lr", 3e-4)
    assert again is first and fills.count == 1 and float(first) == pytest.approx(3e-4)
    for value in (1e-3, 3e-4, 2.5):
        out = scalars(device, "lr", value)
        assert out is first and float(out) == pytest.approx(value)
    assert float(scalars(device, "bias1", 0.1)) == pytest.approx(0.1) and float(first) == pytest.approx(2.5)


def test_adamw_kernel_names_the_path_adamw_batch_step_takes():
    """fp32 moments of fp32 tensors: torch's fused AdamW; 4-bit or factored moments off CUDA: the torch math (the
    Triton kernels need CUDA, checked in tests/test_cuda_graph.py); bf16 tensors with fp32 moments: the torch math."""
    from hf_q4shampoo.first_order import adamw_kernel

    def stacked(p, **kw):
        state = init_first_order_state(p, "adamw", **kw)
        return {k: state[k].unsqueeze(0) for k in first_order_keys(state)}

    small, big = torch.randn(SHAPE_FP32), torch.randn(SHAPE_4BIT)
    assert adamw_kernel([small], stacked(small, bits=4), True) == "fused"  # under the 4-bit threshold
    assert adamw_kernel([big], stacked(big, bits=32), True) == "fused"
    assert adamw_kernel([big], stacked(big, bits=4), True) == "torch"
    assert adamw_kernel([big], stacked(big, bits=32, v="factored"), True) == "torch"
    half = big.bfloat16()
    assert adamw_kernel([half], stacked(half, bits=32), True) == "torch"
