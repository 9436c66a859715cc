"""The first step's warm-ups off the GPU: nothing to warm, and no dry run (the caller's code runs once, for real)."""

import torch

from hf_q4shampoo import Q4Shampoo, triton_precompile, warmup


def test_without_cuda_there_is_no_dry_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    assert triton_precompile.compile_in_parallel(lambda: ran.append(1)) is False
    assert ran == []  # not run as a dry run: the caller runs it for real


def test_a_cpu_layout_plans_no_warm_up(monkeypatch):
    monkeypatch.setattr(warmup, "_DONE", set())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 32))
    opt = Q4Shampoo(model.parameters(), lr=1e-3, update_freq=1, root_freq=1, min_quant_numel=256)
    model(torch.randn(4, 48)).square().mean().backward()
    opt.step()
    layout = opt._current_layout()
    assert layout.buckets  # there are factors to warm on a GPU
    assert warmup.first_step_warm_ups(opt, layout) == []
