"""``overlap_refresh``: the step's update first, with the roots of earlier steps, then its statistics updates and root
refreshes (on a side CUDA stream on GPUs; in line here). The CUDA stream half is in tests/test_cuda.py."""

import pytest
import torch

from hf_q4shampoo import Q4Shampoo, Q4ShampooConfig
from hf_q4shampoo.config import ConfigError, parse_optim_args
from hf_q4shampoo.schedule import first_due

SHAPES = [(64, 48), (64, 48), (48,), (32, 96)]


def _flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + key] = value.clone()
        elif isinstance(value, list):
            for i, item in enumerate(value):
                out.update(_flat(item, f"{prefix}{key}[{i}]."))
        elif isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
    return out


def _trajectory(grads, **options):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = Q4Shampoo(params, lr=1e-2, weight_decay=0.1, update_freq=1, root_freq=3, **options)
    out = []
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        factors = {}
        for i, p in enumerate(params):
            factors.update({f"{i}.{k}": v for k, v in _flat(opt.state[p]).items() if k.startswith("regions")})
        out.append(([p.detach().clone() for p in params], factors, opt))
    return out


@pytest.mark.parametrize("grafting", ["norm", "adam"])
def test_overlap_refresh_uses_each_root_one_step_later_and_keeps_the_same_factors(grafting):
    # gradients fixed in advance (they do not depend on the parameters), so the factors must agree bit for bit;
    # the parameters agree until a member's first root, which the overlapped run applies one step later
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(*s, generator=g) * torch.linspace(0.1, 3, s[-1]) for s in SHAPES] for _ in range(9)]
    inline = _trajectory(grads, grafting=grafting)
    overlap = _trajectory(grads, grafting=grafting, overlap_refresh=True)
    never = _trajectory(grads, grafting=grafting, start_precond_step=100)  # no root inside the run
    opt = inline[0][2]
    first_root = {
        i: first_due(3, 1, opt.state[p]["root_offset"])
        for i, p in enumerate(opt.param_groups[0]["params"])
        if p.dim() == 2
    }
    assert first_root and all(t <= 7 for t in first_root.values())  # every matrix gets a root inside the run
    for t in range(9):
        (p_in, f_in, _), (p_ov, f_ov, _), (p_never, _, _) = inline[t], overlap[t], never[t]
        assert f_in.keys() == f_ov.keys() and len(f_in) > 0
        assert [k for k in f_in if not torch.equal(f_in[k], f_ov[k])] == [], t + 1
        for i, first in first_root.items():
            step = t + 1
            # the overlapped run steps as if unpreconditioned through its first root step, then differs
            assert torch.equal(p_ov[i], p_never[i]) == (step <= first), (i, step)
            assert torch.equal(p_in[i], p_never[i]) == (step < first), (i, step)
        assert torch.equal(p_ov[2], p_in[2])  # the vector takes the first-order step alone in both


def test_overlap_refresh_is_a_validated_boolean_option():
    assert Q4ShampooConfig().overlap_refresh is False
    assert Q4ShampooConfig(**parse_optim_args("overlap_refresh=true")).overlap_refresh is True
    with pytest.raises(ConfigError, match="overlap_refresh"):
        Q4ShampooConfig(overlap_refresh="sometimes")


def test_overlap_refresh_state_dict_round_trip_continues_the_same_trajectory():
    g = torch.Generator().manual_seed(4)
    grads = [[torch.randn(*s, generator=g) for s in SHAPES] for _ in range(8)]
    straight = _trajectory(grads, overlap_refresh=True)
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = Q4Shampoo(params, lr=1e-2, weight_decay=0.1, update_freq=1, root_freq=3, overlap_refresh=True)
    for t, step_grads in enumerate(grads):
        if t == 4:  # resume into a fresh optimizer mid-run
            saved = opt.state_dict()
            opt = Q4Shampoo(params, lr=1e-2, weight_decay=0.1, update_freq=1, root_freq=3, overlap_refresh=True)
            opt.load_state_dict(saved)
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, straight[-1][0]))
