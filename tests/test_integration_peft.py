"""peft LoRA with ``optim="q4shampoo"`` (issue #3, item 6).

LoRA's B starts at zero, so A's first gradients are exactly zero; adapters are very rectangular
(r x d), so only their short (r) side may be preconditioned, or the d x d factors would dwarf the
adapter itself (``max_aspect_ratio``).
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.memory import optimizer_state_bytes, unwrap_optimizer

from tiny_hf import (  # noqa: F401 (one_torch_thread: autouse fixture)
    lm_dataset,
    nested_tensors,
    one_torch_thread,
    tiny_gpt2,
    training_args,
)

R = 2


def _lora_gpt2():
    base = tiny_gpt2(n_embd=64)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = LoraConfig(
        r=R,
        lora_alpha=2 * R,
        target_modules=["c_attn", "c_fc"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )  # GPT-2 uses Conv1D: fan_in_fan_out
    return get_peft_model(base, config), frozen


class FirstStep(TrainerCallback):
    """Records the adapters' gradients and values around the first optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.a_grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n]
            self.a_before = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.a_after = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]
            self.b_after = [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]


@pytest.mark.heavy
def test_lora_trains_only_adapters_without_nan(tmp_path):
    model, frozen = _lora_gpt2()
    first = FirstStep()
    # roots at every step, from step 1, when A's statistics are still all zero
    args = training_args(tmp_path, max_steps=12, learning_rate=3e-2, optim_args="update_freq=1,root_freq=1")
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[first])
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, Q4Shampoo)

    # only the adapters are optimised; the base model is untouched
    names = {id(p): n for n, p in model.named_parameters()}
    optimised = [p for g in opt.param_groups for p in g["params"]]
    assert optimised and {id(p) for p in optimised} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all("lora_" in names[id(p)] for p in optimised)
    after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    assert set(after) == set(frozen) and all(torch.equal(after[n], p) for n, p in frozen.items())

    # step 1: A's gradients are exactly zero (B = 0), A does not move and nothing becomes NaN; B moves
    assert all(torch.count_nonzero(g) == 0 for g in first.a_grads)
    assert all(torch.equal(a, b) for a, b in zip(first.a_before, first.a_after))
    assert all(torch.count_nonzero(b) > 0 for b in first.b_after)
    # later both train, and everything stays finite
    assert all(torch.isfinite(p).all() for p in optimised)
    assert all(
        not torch.equal(a, b) for a, b in zip(first.a_before, [p for n, p in model.named_parameters() if "lora_A" in n])
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])

    # no wasted memory: each adapter is preconditioned on its r side only (one r x r factor)
    for p in optimised:
        plan = opt.block_plan(p.shape)
        sides = [
            (region.block_rows if region.precond_rows else None, region.block_cols if region.precond_cols else None)
            for region in plan.regions
        ]
        assert sides in ([(R, None)], [(None, R)]), (names[id(p)], sides)


def test_large_rectangular_adapter_memory_and_zero_gradients():
    # realistic LoRA proportions (r = 8, d = 4096): 4-bit first-order states, r x r factors only
    r, d = 8, 4096
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(r, d, generator=g) * 0.01)
    b = torch.nn.Parameter(torch.zeros(d, r))
    opt = Q4Shampoo([a, b], lr=1e-3, update_freq=1, root_freq=1)
    a0 = a.detach().clone()
    for step in range(4):
        a.grad = torch.zeros_like(a) if step < 2 else torch.randn(r, d, generator=g)  # zero while B == 0
        b.grad = torch.randn(d, r, generator=g)
        opt.step()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        if step < 2:
            assert torch.equal(a, a0)
    assert not torch.equal(a, a0)
    report = optimizer_state_bytes(opt)
    shampoo = report.by_kind["statistics"] + report.by_kind["roots"] + report.by_kind["error_feedback"]
    assert shampoo <= 2 * 2 * r * r * 4  # two r x r factors (statistics + root) per adapter, at most fp32
    assert report.total < report.adamw_equivalent  # 4-bit moments: below AdamW's 8 bytes per parameter
    assert max(t.numel() for s in opt.state.values() for t in nested_tensors(s)) <= r * d
