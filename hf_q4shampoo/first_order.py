"""First-order steps that run on the (preconditioned, grafted) gradient: AdamW and SGD-momentum.

Their states are 4-bit by default (paper 3, papers.md §4.1):

* signed moments (Adam's m, SGD's momentum): block-wise absmax over the flattened tensor in blocks
  of 128, dynamic-exponent code ("B128/DE");
* Adam's second moment v: rank-1 normalisation with the zero-free linear code ("Rank-1/Linear");
  1-D tensors fall back to blocks of 128 with the same code;
* tensors with at most 4096 entries stay fp32 (paper 3 App. D.1).

With ``first_order_bits=32`` every moment is a plain fp32 tensor.

The update formulas are those of paper 2's ``ShampooAdamW`` / ``ShampooSGD`` (papers.md §1.2):
AdamW decays weights first (decoupled) and then takes a bias-corrected Adam step; SGD adds the
L2 term to the (grafted) gradient, then ``m <- mu m + g``, ``p <- p - lr m`` (or Nesterov).
"""

from __future__ import annotations

import math

import torch

from .quant import dequantize_blockwise, dequantize_rank1, quantize_blockwise, quantize_rank1

__all__ = ["FIRST_ORDER", "init_first_order_state", "adamw_step", "sgd_step", "first_order_keys"]

FIRST_ORDER = ("adamw", "sgd")
QUANT_MIN_NUMEL = 4096  # tensors with at most this many entries keep fp32 moments (paper 3)
SIGNED_BLOCK = 128
State = dict[str, torch.Tensor]


def _quantized(numel: int, bits: int) -> bool:
    return bits == 4 and numel > QUANT_MIN_NUMEL


def _store_signed(name: str, x: torch.Tensor, bits: int) -> State:
    if not _quantized(x.numel(), bits):
        return {name: x.contiguous()}
    codes, scales = quantize_blockwise(x.reshape(1, -1), "dynamic", SIGNED_BLOCK)
    return {f"{name}_codes": codes, f"{name}_scales": scales}


def _load_signed(state: State, name: str, shape: torch.Size) -> torch.Tensor:
    if name in state:
        return state[name]
    numel = math.prod(shape)
    x = dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_scales"], numel, "dynamic", SIGNED_BLOCK)
    return x.reshape(shape)


def _store_nonneg(name: str, x: torch.Tensor, bits: int) -> State:
    if not _quantized(x.numel(), bits):
        return {name: x.contiguous()}
    if x.ndim >= 2:
        return {f"{name}_{key}": v for key, v in quantize_rank1(x).items()}
    codes, scales = quantize_blockwise(x.reshape(1, -1), "zero_free_linear", SIGNED_BLOCK)
    return {f"{name}_codes": codes, f"{name}_scales": scales}


def _load_nonneg(state: State, name: str, shape: torch.Size) -> torch.Tensor:
    if name in state:
        return state[name]
    if f"{name}_scales" in state:
        numel = math.prod(shape)
        x = dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_scales"], numel, "zero_free_linear", SIGNED_BLOCK)
        return x.reshape(shape)
    q = {key[len(name) + 1 :]: v for key, v in state.items() if key.startswith(f"{name}_")}
    return dequantize_rank1(q, shape)


def first_order_keys(state: State) -> list[str]:
    """Keys of ``state`` that belong to the first-order moments."""
    return [k for k in state if k.startswith(("exp_avg", "momentum_buffer"))]


def init_first_order_state(p: torch.Tensor, kind: str, bits: int) -> State:
    zeros = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    if kind == "adamw":
        return {**_store_signed("exp_avg", zeros, bits), **_store_nonneg("exp_avg_sq", zeros, bits)}
    return _store_signed("momentum_buffer", zeros, bits)


def _replace(state: State, name: str, new: State) -> None:
    for key in [k for k in state if k == name or k.startswith(f"{name}_")]:
        del state[key]
    state.update(new)


def adamw_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    *,
    step: int,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bits: int,
) -> None:
    """One AdamW step on ``p`` with the fp32 direction ``grad`` (already preconditioned/grafted)."""
    beta1, beta2 = betas
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    m = _load_signed(state, "exp_avg", p.shape).lerp(grad, 1.0 - beta1)
    v = _load_nonneg(state, "exp_avg_sq", p.shape).mul(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    _replace(state, "exp_avg", _store_signed("exp_avg", m, bits))
    _replace(state, "exp_avg_sq", _store_nonneg("exp_avg_sq", v, bits))
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
    p.sub_((m / denom).mul_(lr / bias1))  # m may be the stored fp32 state: no in-place op on it


def sgd_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    bits: int,
) -> None:
    """One SGD-momentum step (coupled L2 added to the grafted direction, no dampening)."""
    if weight_decay:
        grad = grad.add(p.float(), alpha=weight_decay)
    if momentum:
        buf = _load_signed(state, "momentum_buffer", p.shape).mul(momentum).add_(grad)
        _replace(state, "momentum_buffer", _store_signed("momentum_buffer", buf, bits))
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    p.sub_(grad * lr)
