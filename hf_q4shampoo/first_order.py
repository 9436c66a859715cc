"""First-order steps that run on the (preconditioned, grafted) gradient: AdamW and SGD-momentum.

Their states are 4-bit by default (paper 3, papers.md §4.1; fp32 with ``bits=32``, Linear-2 signed moments with
``m_map="linear2"``, Adafactor's factored v with ``v="factored"``): how they are stored, created and counted is
:mod:`hf_q4shampoo.moments`'s.

Skipped members: every step takes an optional per-member ``keep`` flag ``(K,)`` (bool, on the
directions' device). A member whose flag is false leaves its parameter and moments exactly as they were
(the optimizer clears it for a gradient with a NaN/inf entry). The flag is never read on the host, so a
step does not wait for the accelerator: the new values of every member are computed and the old ones of
the skipped members selected back with ``torch.where`` (or, for torch's fused AdamW, which cannot skip
single tensors of a batch, restored from a copy taken before the call).

Adam grafting (``adam_graft_batch_step``, Distributed Shampoo's rule) keeps the AdamW state with other
contents: v is the second moment of the raw gradient G, whose Adam step ``A = G / (sqrt(v^) + eps)`` only
sets the size of Shampoo's direction, and m is the momentum of the grafted direction, which is the step itself
(no division by sqrt(v)). Filtered Adam grafting (``adam_filtered_batch_step``, Distributed Shampoo's algorithm
with beta1 > 0) keeps AdamW's moments of the raw gradient and hands the grafting both the bias-corrected momentum M
(which Shampoo preconditions) and the AdamW step ``M / (sqrt(v^) + eps)`` (whose norm it takes); the step is the
grafted direction itself.

The update formulas are those of paper 2's ``ShampooAdamW`` / ``ShampooSGD`` (papers.md §1.2):
AdamW decays weights first (decoupled) and then takes a bias-corrected Adam step; SGD adds the
L2 term to the (grafted) gradient, then ``m <- mu m + g``, ``p <- p - lr m`` (or Nesterov).

Speed: a step works on a *batch* of tensors with one shape (and one parameter group) whose states are
stacked along a leading dimension in persistent buffers (``layout.py``; the per-tensor state that
``state_dict`` holds is views of them) and updated in place, so the number of kernels does not grow
with the number of tensors and nothing is concatenated per step. On CUDA, 4-bit AdamW of matrices runs
in hand-written Triton kernels (``triton_kernels.py``, one compilation for every shape; rank-1 or factored v);
fp32 moments use torch's fused AdamW; everything else is the pure-PyTorch math below (compiled with ``torch.compile``
on accelerators), which is also the tested oracle of the kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from . import moments as codes  # the codecs by module, so a study can swap them in one place
from . import triton_kernels
from .capture_guard import refuse_in_capture
from .kernels import maybe_compiled
from .moments import Moments, State, _batched, _is_quantized, _member_mask, _write_back

__all__ = [
    "total_skipped",
    "adamw_batch_step",
    "sgd_batch_step",
    "adam_graft_batch_step",
    "adam_filtered_batch_step",
    "adam_scalars",
    "fill_scalars",
    "adamw_kernel",
    "factored_ema",
]

# ---------------------------------------------------------------------------------------------
# the math (pure functions of batched tensors; compiled on accelerators)
# ---------------------------------------------------------------------------------------------


def factored_ema(v: Moments, d: torch.Tensor, beta2: float) -> tuple[Moments, torch.Tensor, torch.Tensor]:
    """Adafactor's second moment of ``d`` (``(K, ...)``, viewed as ``(K, rows, cols)``): the new row and column
    EMAs of ``d^2`` (the state to store) and the two factors of the new ``v = (row / mean(row)) col^T``. The means of
    ``d^2`` are squared norms over ``cols`` / ``rows``, so no ``d^2`` the size of ``d`` is made. One definition for
    the torch math below and the Triton kernel (:func:`adamw_batch_step` hands it the factors)."""
    d = d.reshape(d.shape[0], v["_row"].shape[-1], -1)
    row = v["_row"] * beta2 + (1.0 - beta2) * torch.linalg.vector_norm(d, dim=-1).square() / d.shape[-1]
    col = v["_col"] * beta2 + (1.0 - beta2) * torch.linalg.vector_norm(d, dim=-2).square() / d.shape[-2]
    scale = row.mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return {"_row": row, "_col": col}, row / scale, col


def _factored_v(v: Moments, d: torch.Tensor, beta2: float) -> tuple[Moments, torch.Tensor]:
    """Adafactor's second moment: new row / column EMAs of ``d^2`` and the full ``v`` they give (shape of d)."""
    state, row, col = factored_ema(v, d, beta2)
    return state, (row.unsqueeze(-1) * col.unsqueeze(-2)).reshape(d.shape)


def _second_moment(v: Moments, d: torch.Tensor, beta2: float, quantized: bool) -> tuple[Moments, torch.Tensor]:
    """Adam's ``v <- beta2 v + (1 - beta2) d^2``: the state to store (factored, 4-bit or fp32, as ``v`` is) and
    the new ``v`` in full (shape of ``d``), for every AdamW-shaped step of this module."""
    if "_row" in v:
        return _factored_v(v, d, beta2)
    v_new = codes.decode_nonneg(v, tuple(d.shape)) * beta2 + (1.0 - beta2) * d * d
    return codes.encode_nonneg(v_new, quantized), v_new


def _kept(update: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``update`` with the skipped members' rows zeroed (``where``, so a NaN there does not leak through)."""
    return update if keep is None else torch.where(_member_mask(keep, update), update, 0.0)


def _adamw_math(
    m: Moments,
    v: Moments,
    d: torch.Tensor,
    lr: torch.Tensor,
    bias1: torch.Tensor,
    bias2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    quantized: bool,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
):
    shape = tuple(d.shape)
    m_new = codes.decode_signed(m, shape, m_map).lerp(d, 1.0 - beta1)
    v_state, v_new = _second_moment(v, d, beta2, quantized)
    update = (m_new / bias1) / (v_new.sqrt() / bias2_sqrt + eps) * lr
    return codes.reencode_signed(m, m_new, quantized, m_map), v_state, _kept(update, keep)


def _sgd_math(
    buf: Moments,
    d: torch.Tensor,
    lr: torch.Tensor,
    momentum: float,
    nesterov: bool,
    quantized: bool,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
):
    new = codes.decode_signed(buf, tuple(d.shape), m_map) * momentum + d
    direction = d + momentum * new if nesterov else new
    return codes.reencode_signed(buf, new, quantized, m_map), _kept(direction * lr, keep)


def _adam_step_math(v: Moments, g: torch.Tensor, bias2_sqrt: torch.Tensor, beta2: float, eps: float, quantized: bool):
    """Adam grafting's source of norms: the new second moment of the raw gradient and its Adam step
    ``A = g / (sqrt(v / (1 - beta2^t)) + eps)``."""
    v_state, v_new = _second_moment(v, g, beta2, quantized)
    return v_state, g / (v_new.sqrt() / bias2_sqrt + eps)


def _momentum_math(
    m: Moments,
    d: torch.Tensor,
    lr: torch.Tensor,
    bias1: torch.Tensor,
    beta1: float,
    quantized: bool,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
):
    """Adam grafting's momentum: ``m <- beta1 m + (1 - beta1) d`` and the update ``lr m / (1 - beta1^t)``."""
    m_new = codes.decode_signed(m, tuple(d.shape), m_map).lerp(d, 1.0 - beta1)
    return codes.reencode_signed(m, m_new, quantized, m_map), _kept(m_new * (lr / bias1), keep)


def _filtered_adam_math(
    m: Moments,
    v: Moments,
    g: torch.Tensor,
    bias1: torch.Tensor,
    bias2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    quantized: bool,
    m_map: str = "dynamic",
):
    """Filtered Adam grafting's moments: the new m and v of the raw gradient, the bias-corrected momentum
    ``M = m / (1 - beta1^t)`` and the AdamW step ``M / (sqrt(v / (1 - beta2^t)) + eps)``."""
    shape = tuple(g.shape)
    m_new = codes.decode_signed(m, shape, m_map).lerp(g, 1.0 - beta1)
    v_state, v_new = _second_moment(v, g, beta2, quantized)
    filtered = m_new / bias1
    return (
        codes.reencode_signed(m, m_new, quantized, m_map),
        v_state,
        filtered,
        filtered / (v_new.sqrt() / bias2_sqrt + eps),
    )


def _host_float(x: float | torch.Tensor) -> float | torch.Tensor:
    """A Python float for CPU tensors (free to read); device tensors stay tensors."""
    return float(x) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x


class _DeviceScalars:
    """0-dim fp32 tensors on a device, refilled in place when their value changes.

    ``torch.tensor(x, device="cuda")`` copies from pageable host memory and makes the host wait for
    the stream; ``fill_`` is an ordinary kernel launch. Compiled functions take these tensors, so a
    new learning rate never triggers a recompilation. A step asks for the same three values once per
    batch; only the first ask of a new value launches a fill (the host's launches are the cost of a step
    on small models, docs/perf_notes.md v15). Kernels queued earlier on the stream still read the old
    value: a fill is ordered after them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, str], tuple[torch.Tensor, float]] = {}

    def __call__(self, device: torch.device, name: str, value: float | torch.Tensor) -> torch.Tensor:
        value = _host_float(value)
        if isinstance(value, torch.Tensor):  # already on an accelerator: use it as it is
            return value.to(device=device, dtype=torch.float32)
        key = (device, name)
        held = self._buffers.get(key)
        if held is not None and held[1] == value:
            return held[0]
        # a graph would replay this fill with the capture's value forever (step_graph.py fills before replay)
        refuse_in_capture(device, f"a new value of the device scalar {name!r}")
        buf = held[0] if held is not None else torch.empty((), dtype=torch.float32, device=device)
        self._buffers[key] = (buf, value)
        return buf.fill_(value)


_scalars = _DeviceScalars()


def adam_scalars(lr: float | torch.Tensor, step: int, betas: tuple[float, float]) -> dict[str, float | torch.Tensor]:
    """The step-dependent scalars an Adam-type batch step reads from the device, by the names it asks
    :data:`_scalars` for: the learning rate, the bias corrections and the step count."""
    beta1, beta2 = betas
    return {
        "lr": lr,
        "bias1": 1.0 - beta1**step,
        "bias2_sqrt": math.sqrt(1.0 - beta2**step),
        "step": float(step),
    }


def fill_scalars(device: torch.device, values: dict[str, float | torch.Tensor]) -> None:
    """Bring the device scalars to ``values`` (a fill for each that changed): what a replayed CUDA graph of a
    step then reads."""
    for name, value in values.items():
        _scalars(device, name, value)


def _apply_update(params: list[torch.Tensor], update: torch.Tensor) -> None:
    parts = update.to(params[0].dtype).unbind(0)
    torch._foreach_sub_(params, list(parts))


def _decay(
    params: list[torch.Tensor], lr: float | torch.Tensor, weight_decay: float, keep: torch.Tensor | None
) -> None:
    """Decoupled weight decay ``p <- (1 - lr wd) p`` of the members whose ``keep`` flag is set.

    With flags, ``p <- p + (-lr wd) * keep * p``: the flag is exactly 0 or 1 in any dtype, so it can be a
    device tensor in the parameters' dtype without rounding the decay (a factor ``1 - lr wd`` rounded to
    bf16 would be 1).
    """
    lr = _host_float(lr)
    if keep is None:
        decay = 1.0 - lr * weight_decay
        torch._foreach_mul_(params, decay if not isinstance(decay, torch.Tensor) else decay.to(params[0].dtype))
        return
    if isinstance(lr, torch.Tensor):  # on the accelerator: fold the rate into the per-member factors
        factors = (keep.float() * (lr.to(keep.device, torch.float32) * -weight_decay)).to(params[0].dtype)
        torch._foreach_addcmul_(params, params, list(factors.unbind(0)))
    else:
        torch._foreach_addcmul_(params, params, list(keep.to(params[0].dtype).unbind(0)), value=-lr * weight_decay)


def _fused_adamw(
    params: list[torch.Tensor],
    directions: torch.Tensor,
    moments: State,
    step: int,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    keep: torch.Tensor | None = None,
) -> None:
    """fp32 moments of fp32 parameters: torch's fused AdamW kernel (one launch for the whole batch, no
    compilation), which computes the same update as :func:`_adamw_math` (decoupled decay, bias-corrected
    Adam step; equal up to rounding). Updates the moments in place.

    Skipped members: the kernel's ``found_inf`` skips a whole call, so a batch of one passes its flag
    there (no extra work); a larger batch copies parameters and moments first and puts the skipped
    members' values back (three small ``where``s: this path holds the small tensors of a model).
    """
    device = directions.device
    scalars = adam_scalars(lr, step, betas)
    # both from device buffers, never host floats: a captured step (step_graph.py) replays with new values
    lr = _scalars(device, "lr", scalars["lr"])
    steps = [_scalars(device, "step", scalars["step"])] * len(params)
    m, v = moments["exp_avg"], moments["exp_avg_sq"]
    found_inf = None
    saved = None
    if keep is not None and len(params) == 1:
        found_inf = (~keep).float()
    elif keep is not None:
        saved = (torch.stack(params), m.clone(), v.clone())
    torch._fused_adamw_(
        params,
        list(directions.unbind(0)),
        list(m.unbind(0)),
        list(v.unbind(0)),
        [],
        steps,
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
        found_inf=found_inf,
    )
    if saved is not None:
        old_p, old_m, old_v = saved
        mask = _member_mask(keep, old_p)
        m.copy_(torch.where(mask, m, old_m))
        v.copy_(torch.where(mask, v, old_v))
        torch._foreach_copy_(params, list(torch.where(mask, torch.stack(params), old_p).unbind(0)))


def adamw_kernel(params: list[torch.Tensor], moments: State, compile_: bool) -> str:
    """Which implementation :func:`adamw_batch_step` takes for these same-shape tensors: ``"fused"`` (torch's
    fused AdamW: fp32 moments of fp32 tensors), ``"triton"`` (the 4-bit kernels: CUDA, ``compile_``, 2-D tensors
    with 4-bit m and a rank-1 4-bit or factored v) or ``"torch"`` (the compiled or eager torch math). The first two
    read every step-dependent value from device scalars, so a CUDA graph of them replays after :func:`fill_scalars`."""
    p = params[0]
    quantized = _is_quantized(moments)
    if not quantized and "exp_avg_sq_row" not in moments and p.dtype == torch.float32:
        return "fused"
    if quantized and p.device.type == "cuda" and compile_ and p.dim() == 2:
        if triton_kernels.supports(params, p.unsqueeze(0), moments):  # a 2-D tensor's directions are (K, r, c)
            return "triton"
    return "torch"


def adamw_batch_step(
    params: list[torch.Tensor],
    directions: torch.Tensor,
    moments: State,
    *,
    step: int,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bits: int,
    compile_: bool = False,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
) -> None:
    """One AdamW step for K same-shape tensors, moments updated in place.

    ``directions`` is their fp32 ``(K, *shape)`` update direction; ``moments`` their stacked state
    (``exp_avg*`` keys, leading dimension K); ``keep`` optional per-member flags (module docstring).
    Whether the moments are 4-bit is read from ``moments`` (``bits`` is kept for callers' clarity).
    """
    del bits  # the stored state says how it is stored
    beta1, beta2 = betas
    device = directions.device
    kernel = adamw_kernel(params, moments, compile_)  # the state says which moments it holds
    if kernel == "fused":
        _fused_adamw(params, directions, moments, step, lr, betas, eps, weight_decay, keep)
        return
    values = adam_scalars(lr, step, betas)
    scalars = tuple(_scalars(device, name, values[name]) for name in ("lr", "bias1", "bias2_sqrt"))
    if kernel == "triton":
        v_factors = None
        if "exp_avg_sq_row" in moments:  # factored v: its EMAs here, the kernel reads v from their factors
            v_state, row, col = factored_ema(_batched(moments, "exp_avg_sq"), directions, beta2)
            _write_back(moments, "exp_avg_sq", v_state, keep)
            v_factors = (row.contiguous(), col.contiguous())
        triton_kernels.adamw4_step(
            params,
            directions,
            moments,
            *scalars,
            beta1,
            beta2,
            eps,
            weight_decay,
            m_map,
            keep=keep,
            v_factors=v_factors,
        )
        return
    quantized = _is_quantized(moments)
    if weight_decay:
        _decay(params, lr, weight_decay, keep)
    fn = maybe_compiled(_adamw_math, device, compile_)
    m, v, update = fn(
        _batched(moments, "exp_avg"),
        _batched(moments, "exp_avg_sq"),
        directions,
        *scalars,
        beta1,
        beta2,
        eps,
        quantized,
        m_map,
        keep,
    )
    _write_back(moments, "exp_avg", m, keep)
    _write_back(moments, "exp_avg_sq", v, keep)
    _apply_update(params, update)


def sgd_batch_step(
    params: list[torch.Tensor],
    directions: torch.Tensor,
    moments: State,
    *,
    lr: float | torch.Tensor,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    bits: int,
    compile_: bool = False,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
) -> None:
    """One SGD-momentum step for K same-shape tensors (coupled L2 added to the grafted direction);
    ``keep`` optional per-member flags (module docstring)."""
    del bits  # the stored state says how it is stored
    device = directions.device
    if weight_decay:
        directions = directions + weight_decay * torch.stack([p.float() for p in params])
    if not momentum:
        _apply_update(params, _kept(directions * _scalars(device, "lr", lr), keep))
        return
    quantized = _is_quantized(moments)
    fn = maybe_compiled(_sgd_math, device, compile_)
    buf, update = fn(
        _batched(moments, "momentum_buffer"),
        directions,
        _scalars(device, "lr", lr),
        momentum,
        nesterov,
        quantized,
        m_map,
        keep,
    )
    _write_back(moments, "momentum_buffer", buf, keep)
    _apply_update(params, update)


def adam_graft_batch_step(
    params: list[torch.Tensor],
    grads: torch.Tensor,
    moments: State,
    graft: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    step: int,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    compile_: bool = False,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One step of Adam grafting for K same-shape tensors, moments (AdamW's keys) updated in place::

        v <- beta2 v + (1 - beta2) G^2 ;  A = G / (sqrt(v / (1 - beta2^t)) + eps)     (Adam step of G)
        D = graft(A)                                   (Shampoo's direction at A's norm; A before a root)
        m <- beta1 m + (1 - beta1) D ;  W <- (1 - lr wd) W - lr m / (1 - beta1^t)

    ``grads`` is the raw fp32 ``(K, *shape)`` gradient; ``graft`` maps the Adam steps to the directions and
    per-member flags of whether they are finite (None: all are). A member whose ``keep`` or ``graft`` flag
    is false keeps its parameter, m and v as they were. Returns the combined flags (for the skip counters).
    """
    beta1, beta2 = betas
    device = grads.device
    quantized = _is_quantized(moments)
    bias2_sqrt = _scalars(device, "bias2_sqrt", math.sqrt(1.0 - beta2**step))
    v_fn = maybe_compiled(_adam_step_math, device, compile_)
    v, adam_step = v_fn(_batched(moments, "exp_avg_sq"), grads, bias2_sqrt, beta2, eps, quantized)
    directions, ok = graft(adam_step)
    keep = _with_flags(keep, ok)
    m_fn = maybe_compiled(_momentum_math, device, compile_)
    m, update = m_fn(
        _batched(moments, "exp_avg"),
        directions,
        _scalars(device, "lr", lr),
        _scalars(device, "bias1", 1.0 - beta1**step),
        beta1,
        quantized,
        m_map,
        keep,
    )
    _commit_grafted(params, moments, m, v, update, lr, weight_decay, keep)
    return keep


def adam_filtered_batch_step(
    params: list[torch.Tensor],
    grads: torch.Tensor,
    moments: State,
    graft: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    *,
    step: int,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    compile_: bool = False,
    m_map: str = "dynamic",
    keep: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One step of filtered Adam grafting (Distributed Shampoo's order) for K same-shape tensors, moments
    (AdamW's keys, moments of the raw gradient) updated in place::

        m <- beta1 m + (1 - beta1) G ;  v <- beta2 v + (1 - beta2) G^2
        M = m / (1 - beta1^t) ;  A = M / (sqrt(v / (1 - beta2^t)) + eps)      (the AdamW step)
        D = graft(M, A)                 (Shampoo's direction of M at A's norm, per block; A before a root)
        W <- (1 - lr wd) W - lr D

    ``grads`` is the raw fp32 ``(K, *shape)`` gradient; ``graft`` maps (M, A) to the directions and per-member
    flags of whether they are finite (None: all are). A member whose ``keep`` or ``graft`` flag is false keeps
    its parameter, m and v as they were. Returns the combined flags (for the skip counters).
    """
    beta1, beta2 = betas
    device = grads.device
    quantized = _is_quantized(moments)
    fn = maybe_compiled(_filtered_adam_math, device, compile_)
    m, v, filtered, adam_step = fn(
        _batched(moments, "exp_avg"),
        _batched(moments, "exp_avg_sq"),
        grads,
        _scalars(device, "bias1", 1.0 - beta1**step),
        _scalars(device, "bias2_sqrt", math.sqrt(1.0 - beta2**step)),
        beta1,
        beta2,
        eps,
        quantized,
        m_map,
    )
    directions, ok = graft(filtered, adam_step)
    keep = _with_flags(keep, ok)
    update = _kept(directions * _scalars(device, "lr", lr), keep)
    _commit_grafted(params, moments, m, v, update, lr, weight_decay, keep)
    return keep


def _with_flags(keep: torch.Tensor | None, ok: torch.Tensor | None) -> torch.Tensor | None:
    """The members to step: those ``keep`` allows (None: all) whose grafted direction is finite (``ok``)."""
    if ok is None:
        return keep
    return ok if keep is None else keep & ok


def _commit_grafted(
    params: list[torch.Tensor],
    moments: State,
    m: Moments,
    v: Moments,
    update: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float,
    keep: torch.Tensor | None,
) -> None:
    """The end of a grafted Adam step: the kept members' new m and v stored, decoupled decay, the update."""
    _write_back(moments, "exp_avg_sq", v, keep)
    _write_back(moments, "exp_avg", m, keep)
    if weight_decay:
        _decay(params, lr, weight_decay, keep)
    _apply_update(params, update)


def total_skipped(states: Iterable[dict]) -> int:
    """Sum of the per-parameter ``skipped_updates`` counters (updates skipped for a NaN/inf, see ``keep``).

    For logging: it reads device tensors, so it waits for each device once.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for state in states:
        count = state.get("skipped_updates")
        if isinstance(count, torch.Tensor):
            by_device.setdefault(count.device, []).append(count.reshape(()))
    return sum(int(torch.stack(counts).sum()) for counts in by_device.values())
