"""First-order steps that run on the (preconditioned, grafted) gradient: AdamW and SGD-momentum.

Their states are 4-bit by default (paper 3, papers.md §4.1):

* signed moments (Adam's m, SGD's momentum): block-wise absmax over the flattened tensor in blocks
  of 128, dynamic-exponent code ("B128/DE");
* Adam's second moment v: rank-1 normalisation with the zero-free linear code ("Rank-1/Linear");
  1-D tensors fall back to blocks of 128 with the same code;
* tensors with at most 4096 entries stay fp32 (paper 3 App. D.1).

With ``bits=32`` every moment is a plain fp32 tensor.

The update formulas are those of paper 2's ``ShampooAdamW`` / ``ShampooSGD`` (papers.md §1.2):
AdamW decays weights first (decoupled) and then takes a bias-corrected Adam step; SGD adds the
L2 term to the (grafted) gradient, then ``m <- mu m + g``, ``p <- p - lr m`` (or Nesterov).

Speed: a step works on a *group* of tensors with one shape (and one parameter group): their states
are concatenated along a new leading dimension, updated by one batched computation, and written
back as views, so the number of kernels does not grow with the number of tensors. The per-tensor
state layout (what ``state_dict`` holds) is the same as for a group of one. The math between
"dequantize" and "quantize" is a pure function that can be compiled (``torch.compile``) into a few
fused kernels on accelerators.
"""

from __future__ import annotations

import math
import re

import torch

from .kernels import maybe_compiled
from .quant import dequantize_blockwise, dequantize_rank1, quantize_blockwise, quantize_rank1

__all__ = ["FIRST_ORDER", "init_first_order_state", "adamw_group_step", "sgd_group_step", "first_order_keys",
           "quantized_moments"]

FIRST_ORDER = ("adamw", "sgd")
QUANT_MIN_NUMEL = 4096  # tensors with at most this many entries keep fp32 moments (paper 3)
SIGNED_BLOCK = 128
State = dict[str, torch.Tensor]
Moments = dict[str, torch.Tensor]  # the batched (K, ...) entries of one moment


def quantized_moments(numel: int, bits: int) -> bool:
    """Whether moments of a tensor with ``numel`` entries are stored in 4 bit."""
    return bits == 4 and numel > QUANT_MIN_NUMEL


def first_order_keys(state: State) -> list[str]:
    """Keys of ``state`` that belong to the first-order moments."""
    return [k for k in state if k.startswith(("exp_avg", "momentum_buffer"))]


# ---------------------------------------------------------------------------------------------
# encode / decode a batch of K moments of one shape; ``x`` is (K, *shape) fp32
# ---------------------------------------------------------------------------------------------


def _encode_signed(x: torch.Tensor, quantized: bool) -> Moments:
    if not quantized:
        return {"": x}
    codes, scales = quantize_blockwise(x.reshape(x.shape[0], -1), "dynamic", SIGNED_BLOCK)
    return {"_codes": codes, "_scales": scales}


def _decode_signed(m: Moments, shape: tuple[int, ...]) -> torch.Tensor:
    if "" in m:
        return m[""]
    numel = math.prod(shape[1:])
    return dequantize_blockwise(m["_codes"], m["_scales"], numel, "dynamic", SIGNED_BLOCK).reshape(shape)


def _encode_nonneg(x: torch.Tensor, quantized: bool) -> Moments:
    if not quantized:
        return {"": x}
    if x.ndim >= 3:  # batch dim + a tensor of >= 2 dims: rank-1 normalisation
        return {f"_{k}": v for k, v in quantize_rank1(x, batch_dims=1).items()}
    codes, scales = quantize_blockwise(x.reshape(x.shape[0], -1), "zero_free_linear", SIGNED_BLOCK)
    return {"_codes": codes, "_scales": scales}


def _decode_nonneg(m: Moments, shape: tuple[int, ...]) -> torch.Tensor:
    if "" in m:
        return m[""]
    if "_scales" in m:
        numel = math.prod(shape[1:])
        return dequantize_blockwise(m["_codes"], m["_scales"], numel, "zero_free_linear", SIGNED_BLOCK).reshape(shape)
    return dequantize_rank1({k[1:]: v for k, v in m.items()}, shape, batch_dims=1)


_SUFFIX = re.compile(r"(|_codes|_scales|_max\d+)")


def _gather(states: list[State], name: str) -> Moments:
    """Concatenate one moment of K tensors: codes/scales along dim 0, per-dim maxima and fp32 moments stacked."""
    suffixes = [k[len(name):] for k in states[0] if k.startswith(name) and _SUFFIX.fullmatch(k[len(name):])]
    out = {}
    for suf in suffixes:
        parts = [s[name + suf] for s in states]
        out[suf] = torch.cat(parts) if suf in ("_codes", "_scales") else torch.stack(parts)
    return out


def _scatter(states: list[State], name: str, batched: Moments) -> None:
    for suf, value in batched.items():
        parts = value.split(1) if suf in ("_codes", "_scales") else value.unbind(0)
        for state, part in zip(states, parts):
            state[name + suf] = part


def init_first_order_state(p: torch.Tensor, kind: str, bits: int) -> State:
    def zeros() -> torch.Tensor:  # one buffer per moment: fp32 moments are updated in place (fused AdamW)
        return torch.zeros((1, *p.shape), dtype=torch.float32, device=p.device)

    quantized = quantized_moments(p.numel(), bits)
    state: State = {}
    if kind == "adamw":
        _scatter([state], "exp_avg", _encode_signed(zeros(), quantized))
        _scatter([state], "exp_avg_sq", _encode_nonneg(zeros(), quantized))
    else:
        _scatter([state], "momentum_buffer", _encode_signed(zeros(), quantized))
    return state


# ---------------------------------------------------------------------------------------------
# the math (pure functions of batched tensors; compiled on accelerators)
# ---------------------------------------------------------------------------------------------


def _adamw_math(m: Moments, v: Moments, d: torch.Tensor, lr: torch.Tensor, bias1: torch.Tensor,
                bias2_sqrt: torch.Tensor, beta1: float, beta2: float, eps: float, quantized: bool):
    shape = tuple(d.shape)
    m_new = _decode_signed(m, shape).lerp(d, 1.0 - beta1)
    v_new = _decode_nonneg(v, shape) * beta2 + (1.0 - beta2) * d * d
    update = (m_new / bias1) / (v_new.sqrt() / bias2_sqrt + eps) * lr
    return _encode_signed(m_new, quantized), _encode_nonneg(v_new, quantized), update


def _sgd_math(buf: Moments, d: torch.Tensor, lr: torch.Tensor, momentum: float, nesterov: bool, quantized: bool):
    new = _decode_signed(buf, tuple(d.shape)) * momentum + d
    direction = d + momentum * new if nesterov else new
    return _encode_signed(new, quantized), direction * lr


def _host_float(x: float | torch.Tensor) -> float | torch.Tensor:
    """A Python float for CPU tensors (free to read); device tensors stay tensors."""
    return float(x) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x


class _DeviceScalars:
    """0-dim fp32 tensors on a device, refilled in place every step.

    ``torch.tensor(x, device="cuda")`` copies from pageable host memory and makes the host wait for
    the stream; ``fill_`` is an ordinary kernel launch. Compiled functions take these tensors, so a
    new learning rate never triggers a recompilation.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, str], torch.Tensor] = {}

    def __call__(self, device: torch.device, name: str, value: float | torch.Tensor) -> torch.Tensor:
        value = _host_float(value)
        if isinstance(value, torch.Tensor):  # already on an accelerator: use it as it is
            return value.to(device=device, dtype=torch.float32)
        key = (device, name)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty((), dtype=torch.float32, device=device)
        return buf.fill_(value)


_scalars = _DeviceScalars()


def _apply_update(params: list[torch.Tensor], update: torch.Tensor) -> None:
    parts = update.to(params[0].dtype).unbind(0)
    torch._foreach_sub_(params, list(parts))


def _fused_adamw(params: list[torch.Tensor], directions: torch.Tensor, states: list[State], step: int,
                 lr: float | torch.Tensor, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """fp32 moments of fp32 parameters: torch's fused AdamW kernel (one launch for the whole batch, no
    compilation), which computes the same update as :func:`_adamw_math` (decoupled decay, bias-corrected
    Adam step; equal up to rounding)."""
    device = directions.device
    lr = _host_float(lr)
    if isinstance(lr, torch.Tensor):
        lr = lr.to(device=device, dtype=torch.float32)
    steps = [_scalars(device, "step", float(step))] * len(params)
    torch._fused_adamw_(
        params, list(directions.unbind(0)), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
        steps, lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
        maximize=False,
    )


def adamw_group_step(
    params: list[torch.Tensor],
    directions: torch.Tensor,
    states: list[State],
    *,
    step: int,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bits: int,
    compile_: bool = False,
) -> None:
    """One AdamW step for K same-shape tensors; ``directions`` is their fp32 (K, *shape) update direction."""
    beta1, beta2 = betas
    device = directions.device
    quantized = quantized_moments(params[0].numel(), bits)
    if not quantized and params[0].dtype == torch.float32:
        _fused_adamw(params, directions, states, step, lr, betas, eps, weight_decay)
        return
    if weight_decay:
        decay = 1.0 - _host_float(lr) * weight_decay
        torch._foreach_mul_(params, decay if not isinstance(decay, torch.Tensor) else decay.to(params[0].dtype))
    fn = maybe_compiled(_adamw_math, device, compile_)
    m, v, update = fn(
        _gather(states, "exp_avg"), _gather(states, "exp_avg_sq"), directions, _scalars(device, "lr", lr),
        _scalars(device, "bias1", 1.0 - beta1**step), _scalars(device, "bias2_sqrt", math.sqrt(1.0 - beta2**step)),
        beta1, beta2, eps, quantized,
    )
    _scatter(states, "exp_avg", m)
    _scatter(states, "exp_avg_sq", v)
    _apply_update(params, update)


def sgd_group_step(
    params: list[torch.Tensor],
    directions: torch.Tensor,
    states: list[State],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    bits: int,
    compile_: bool = False,
) -> None:
    """One SGD-momentum step for K same-shape tensors (coupled L2 added to the grafted direction)."""
    device = directions.device
    if weight_decay:
        directions = directions + weight_decay * torch.stack([p.float() for p in params])
    if not momentum:
        _apply_update(params, directions * _scalars(device, "lr", lr))
        return
    quantized = quantized_moments(params[0].numel(), bits)
    fn = maybe_compiled(_sgd_math, device, compile_)
    buf, update = fn(_gather(states, "momentum_buffer"), directions, _scalars(device, "lr", lr), momentum, nesterov,
                     quantized)
    _scatter(states, "momentum_buffer", buf)
    _apply_update(params, update)
