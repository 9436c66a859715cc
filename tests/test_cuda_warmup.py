"""The first step's warm-ups on a GPU: their Triton kernels compile in parallel (a dry run records them), no later
step compiles anything, and the result equals the serial path's bit for bit. Skipped without a GPU."""

import warnings

import pytest
import torch

from hf_q4shampoo import Q4Shampoo, triton_precompile, warmup

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _our_kernels() -> list:
    from triton.runtime.jit import JITFunction

    from hf_q4shampoo import triton_adamw, triton_factor, triton_roots

    mods = (triton_adamw, triton_factor, triton_roots)
    return [v for m in mods for v in vars(m).values() if isinstance(v, JITFunction)]


@pytest.fixture
def cold(monkeypatch, tmp_path):
    """Empty in-process and on-disk Triton caches for this package's kernels, and no warm-up done yet."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for jit in _our_kernels():
        jit.device_caches.clear()
    monkeypatch.setattr(warmup, "_DONE", set())


def _train(steps: int = 5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 70)).cuda()
    opt = Q4Shampoo(model.parameters(), lr=1e-2, update_freq=1, root_freq=2, min_quant_numel=1024)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(64, 96, generator=g).cuda(), torch.randn(64, 70, generator=g).cuda()
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


class _Misses:
    """A Triton ``jit_cache_hook`` that counts this package's compilations (vetoes none)."""

    def __init__(self) -> None:
        self.launches: list[str] = []  # compiled because a real launch missed the cache
        self.preloads: list[str] = []  # compiled ahead, by the parallel warm-up

    def __call__(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002
        if fn.module.startswith("hf_q4shampoo"):
            (self.preloads if is_manual_warmup else self.launches).append(fn.name)
        return None


def test_first_step_compiles_every_kernel_ahead_in_parallel(cold, monkeypatch):
    from triton import knobs

    misses = _Misses()
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", misses)
    calls = []
    real = triton_precompile.compile_in_parallel
    monkeypatch.setattr(warmup, "compile_in_parallel", lambda fn: calls.append(real(fn)) or calls[-1])
    _train()
    assert calls == [True]
    # the adamw, factor and decoder kernels were all compiled ahead (the names differ per kernel)
    assert {"_pass_a", "_pass_b", "_decode_symmetric", "_dequant_factor", "_requant_lower"} <= set(misses.preloads)
    assert misses.launches == []  # no step, the first included, compiled anything when it launched


def test_parallel_and_serial_warm_ups_train_the_same(cold, monkeypatch):
    parallel = _train()
    for jit in _our_kernels():
        jit.device_caches.clear()
    monkeypatch.setattr(warmup, "_DONE", set())
    monkeypatch.setattr(triton_precompile, "ENABLED", False)
    serial = _train()
    for a, b in zip(parallel, serial):
        assert torch.equal(a, b)


def test_a_failed_parallel_compile_warns_and_falls_back_to_the_serial_path(cold, monkeypatch):
    from triton import knobs
    from triton.runtime.jit import JITFunction

    def broken(self, data):
        raise RuntimeError("preload moved")

    monkeypatch.setattr(JITFunction, "preload", broken)
    misses = _Misses()
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", misses)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = _train()
    assert any("in parallel failed" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in params)
    # the fallback warm-ups compiled the decoder at the first step (their real run), not at the first root
    assert "_decode_symmetric" in misses.launches
