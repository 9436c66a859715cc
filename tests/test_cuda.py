"""CUDA checks of the pure-PyTorch path: CUDA results must match the CPU oracle. Skipped without a GPU."""

import pytest
import torch

from hf_q4shampoo import Q4Shampoo, linalg

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _run(device, precond, steps=6, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 70)).to(device)
    opt = Q4Shampoo(model.parameters(), lr=1e-2, precond=precond, update_freq=1, root_freq=2, min_quant_numel=1024,
                    root_method="eigh", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 96, generator=g).to(device)
        y = torch.randn(64, 70, generator=g).to(device)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()], opt


@pytest.mark.parametrize("precond", ["cholesky_ef", "eigen", "naive", "fp32"])
def test_optimizer_cuda_matches_cpu(precond):
    cpu, _ = _run("cpu", precond)
    gpu, opt = _run("cuda", precond)
    for a, b in zip(cpu, gpu):
        # quantization is discontinuous: a value on a rounding boundary can flip a code, so compare loosely
        assert float((a - b).norm() / a.norm()) < 2e-2
    state = opt.state[next(iter(opt.state))]
    assert all(t.device.type == "cuda" for side in state["regions"][0].values() for t in side.values())


def test_newton_cuda_matches_eigh():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 512, 512, generator=g, dtype=torch.float64))
    a = ((q * torch.logspace(0, -6, 512, dtype=torch.float64)) @ q.mT).float().cuda()
    x = linalg.inverse_root_newton(a, ridge_eps=1e-4)
    ref = linalg.inverse_root_eigh(a.double().cpu(), ridge_eps=1e-4)
    assert float((torch.linalg.matrix_norm(x.double().cpu() - ref) / torch.linalg.matrix_norm(ref)).max()) < 5e-3


def test_state_is_created_on_the_parameter_device_and_loads_there():
    _, opt = _run("cuda", "cholesky_ef", steps=2)
    sd = opt.state_dict()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 70)).cuda()
    opt2 = Q4Shampoo(model.parameters(), lr=1e-2, update_freq=1, root_freq=2, min_quant_numel=1024)
    cpu_sd = {**sd, "state": {k: {kk: (vv.cpu() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
                               for k, v in sd["state"].items()}}
    opt2.load_state_dict(cpu_sd)
    st = opt2.state[model[0].weight]
    assert st["step"].device.type == "cpu"
    assert st["regions"][0]["L"]["factor_codes"].device.type == "cuda"
    assert st["regions"][0]["L"]["factor_codes"].dtype == torch.uint8
