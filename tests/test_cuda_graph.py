"""The step's update captured as a CUDA graph (``cuda_graph=True``) against the eager step
(``cuda_graph=False``): the same parameters and state bit for bit, through a changing learning rate, statistics and
root steps in between, gradients that move, a NaN gradient in a replayed step, and groups with two learning rates.
Skipped without a GPU."""

import pytest
import torch

from hf_q4shampoo import Q4Shampoo

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _train(cuda_graph: bool, steps: int = 24, two_lrs: bool = False, move_grads: bool = False, nan_at: int = -1):
    torch.manual_seed(0)
    # 160x96 and 70x160 weights take the Triton 4-bit AdamW (min_quant_numel=1024), the biases torch's fused AdamW
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 70)).cuda()
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 5e-3 if two_lrs else 1e-2}]
    opt = Q4Shampoo(groups, lr=1e-2, update_freq=2, root_freq=4, min_quant_numel=1024, cuda_graph=cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))  # a new lr every step
    g = torch.Generator().manual_seed(1)
    junk = []
    for i in range(steps):
        x, y = torch.randn(64, 96, generator=g).cuda(), torch.randn(64, 70, generator=g).cuda()
        # in place, the gradients keep their addresses; set to None, with another allocation pattern every step,
        # they land elsewhere
        opt.zero_grad(set_to_none=move_grads)
        if move_grads:
            junk.append(torch.empty(4096 * (i % 3 + 1), device="cuda"))
        ((model(x) - y) ** 2).mean().backward()
        if i == nan_at:
            model[0].weight.grad[3, 5] = float("nan")
        opt.step()
        sched.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params], opt


def _same_state(a: Q4Shampoo, b: Q4Shampoo) -> None:
    for (ka, va), (kb, vb) in zip(sorted(_flat(a.state_dict()).items()), sorted(_flat(b.state_dict()).items())):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka


def _flat(tree, prefix=""):
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize(
    "case", [{}, {"move_grads": True}, {"nan_at": 18}, {"two_lrs": True}], ids=["plain", "moving", "nan", "two_lrs"]
)
def test_captured_steps_equal_eager_steps_bit_for_bit(case):
    graphed, g_opt = _train(True, **case)
    eager, e_opt = _train(False, **case)
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)
    _same_state(g_opt, e_opt)
    counts = g_opt._graph_runner().counts
    if case.get("two_lrs"):  # two values of the lr scalar in one step: never captured
        assert counts.captures == 0 and counts.replays == 0
    elif case.get("move_grads"):
        assert counts.eager > 2  # a new address set is run eagerly first
    else:
        # the first update of a key is eager, the second captured, the rest replayed (the keys change while the
        # factors get their first roots, one offset at a time)
        assert counts.captures >= 1 and counts.replays >= 4, counts
    if case.get("nan_at", -1) >= 0:
        assert g_opt.skipped_updates() == e_opt.skipped_updates() == 1
