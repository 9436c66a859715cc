"""Pre-flight estimate (hf_q4shampoo.estimate): agreement with measured state, peer formulas, inputs, CLI."""

import json
import math
import time

import pytest
import torch
from torch import nn

from hf_q4shampoo import Q4Shampoo, estimate_memory
from hf_q4shampoo.config import PRECOND_FORMS
from hf_q4shampoo.estimate import (
    EstimateUnavailable,
    build_meta_model,
    estimate_optimizer_state,
    shampoo_equivalents,
)
from hf_q4shampoo.estimate_cli import main
from hf_q4shampoo.memory import KINDS, optimizer_state_bytes
from hf_q4shampoo.peers import BNB_BLOCK

transformers = pytest.importorskip("transformers")

TOLERANCE = 0.02  # issue #4: estimate and first-step measurement agree within 2%


def gpt2_config():
    return transformers.GPT2Config(vocab_size=96, n_positions=16, n_embd=64, n_layer=2, n_head=2)


def bert_config():
    return transformers.BertConfig(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=160,
        max_position_embeddings=16,
        num_labels=3,
    )


def _step_once(model, opt, batch):
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


def _lm_batch(vocab=96):
    ids = torch.randint(0, vocab, (2, 16))
    return {"input_ids": ids, "labels": ids}


def _rel(a, b):
    return abs(a - b) / b


# ----------------------------------------------------------------------------------------------
# estimate vs measurement
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", PRECOND_FORMS)
def test_estimate_matches_first_step_gpt2(form):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config())
    est = estimate_memory(gpt2_config()).row(f"q4shampoo_{form}")
    opt = Q4Shampoo(model.parameters(), precond=form)  # default schedule: the first step a user runs
    _step_once(model, opt, _lm_batch())
    measured = optimizer_state_bytes(opt)
    assert _rel(est.total_bytes, measured.total) <= TOLERANCE, (est.total_bytes, measured.total)
    for kind in KINDS:
        assert abs(est.by_kind[kind] - measured.by_kind[kind]) <= TOLERANCE * measured.total, kind
    assert est.bytes_per_param == pytest.approx(measured.bytes_per_param, rel=TOLERANCE)


def test_estimate_matches_first_step_bert_classifier_and_adamw():
    torch.manual_seed(0)
    cfg = bert_config()
    est = estimate_memory(cfg, model_class="BertForSequenceClassification", max_precond_dim=32)
    model = transformers.BertForSequenceClassification(cfg)
    batch = {"input_ids": torch.randint(0, 96, (2, 16)), "labels": torch.tensor([0, 2])}

    q4 = Q4Shampoo(model.parameters(), max_precond_dim=32)  # 48 and 160 are cut into blocks of 32
    _step_once(model, q4, batch)
    assert _rel(est.row("q4shampoo_cholesky_ef").total_bytes, optimizer_state_bytes(q4).total) <= TOLERANCE

    adamw = torch.optim.AdamW(model.parameters())
    _step_once(model, adamw, batch)
    assert est.row("adamw").total_bytes == optimizer_state_bytes(adamw).total  # the formula is exact


def test_estimate_counts_only_trainable_parameters_of_a_peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(gpt2_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["c_attn", "c_fc"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    est = estimate_memory(model)
    assert est.num_trainable == sum(p.numel() for p in trainable) < est.num_params
    opt = Q4Shampoo(trainable)
    _step_once(model, opt, _lm_batch())
    measured = optimizer_state_bytes(opt)
    assert measured.num_params == est.num_trainable
    assert _rel(est.selected.total_bytes, measured.total) <= TOLERANCE
    assert any("frozen" in note for note in est.notes)


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: Q4Shampoo(groups, precond="cholesky_ef", update_freq=1, root_freq=1),
        lambda groups: Q4Shampoo(groups, precond="eigen", update_freq=1, root_freq=1),
        lambda groups: torch.optim.AdamW(groups),
        lambda groups: torch.optim.AdamW(groups, fused=True),  # Trainer's default optim: adamw_torch_fused
        lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
    ],
    ids=["cholesky_ef", "eigen", "adamw", "adamw_fused", "sgd_momentum"],
)
def test_estimate_optimizer_state_matches_a_step_with_statistics_and_roots(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 200), nn.ReLU(), nn.Linear(200, 10))
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0},
    ]
    opt = make(groups)
    before = estimate_optimizer_state(opt)
    assert not opt.state  # nothing was created on the real optimizer
    assert before.fp32_shampoo_equivalent > before.adamw_equivalent  # Shampoo's blocks, for AdamW too
    for _ in range(2):  # with update_freq=root_freq=1 both steps update statistics and roots
        model(torch.randn(4, 96)).sum().backward()
        opt.step()
        model.zero_grad()
        after = optimizer_state_bytes(opt)
        assert before.total == pytest.approx(after.total, rel=TOLERANCE)
        assert before.by_group == pytest.approx(after.by_group, rel=TOLERANCE)
        assert before.group_num_params == after.group_num_params
        # the measurement uses the same blocks as the estimate: the optimizer's own, or the default ones
        assert before.fp32_shampoo_equivalent == after.fp32_shampoo_equivalent


def test_estimate_optimizer_state_refuses_an_optimizer_that_cannot_run_on_meta():
    class ItemOptimizer(torch.optim.SGD):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["norm"] = p.grad.norm().item()  # .item() fails on meta tensors

    opt = ItemOptimizer(nn.Linear(4, 4).parameters(), lr=0.1)
    with pytest.raises(EstimateUnavailable, match="ItemOptimizer"):
        estimate_optimizer_state(opt)


# ----------------------------------------------------------------------------------------------
# rows and peer formulas
# ----------------------------------------------------------------------------------------------


def _linear_model(*shapes):
    return nn.ModuleList([nn.Linear(i, o, bias=False) for o, i in shapes])


def test_peer_rows_follow_their_documented_layouts():
    # one 8-bit tensor (64x128 = 8192 entries), one kept 32-bit by bitsandbytes (63x64 = 4032 < 4096)
    model = _linear_model((64, 128), (63, 64))
    est = estimate_memory(model)
    big, small = 64 * 128, 63 * 64
    assert est.row("adamw").total_bytes == 8 * (big + small) + 2 * 4
    bnb = 2 * big + 8 * math.ceil(big / BNB_BLOCK) + 8 * small + 2 * 256 * 4
    assert est.row("adamw_8bit_bnb").total_bytes == bnb
    # torchao (block 256): 8192 % 256 == 0 -> packed; 4032 < 4096 -> fp32 zeros_like; 4-byte steps
    ao = 2 * (big // 2 + 4 * big // 256 + 64) + 8 * small + 2 * 4
    assert est.row("adamw_4bit_torchao").total_bytes == ao
    ao128 = estimate_memory(model, torchao_block_size=128).row("adamw_4bit_torchao").total_bytes
    assert ao128 == 2 * (big // 2 + 4 * big // 128 + 64) + 8 * small + 2 * 4
    adamw_eq, fp32_eq = shampoo_equivalents(model.parameters())
    assert est.row("fp32_shampoo").total_bytes == fp32_eq
    assert fp32_eq == 8 * (big + small) + 8 * (64**2 + 128**2 + 63**2 + 64**2)
    assert adamw_eq == 8 * (big + small)


def test_bnb_row_keeps_embeddings_32bit_like_trainer():
    model = nn.ModuleDict({"emb": nn.Embedding(1000, 64), "proj": nn.Linear(64, 64 * 2, bias=False)})
    n_emb, n_proj = 1000 * 64, 64 * 128
    trainer_like = estimate_memory(model).row("adamw_8bit_bnb").total_bytes
    plain = estimate_memory(model, bnb_embeddings_32bit=False).row("adamw_8bit_bnb").total_bytes
    per_8bit = lambda n: 2 * n + 8 * math.ceil(n / BNB_BLOCK)  # noqa: E731
    assert trainer_like == 8 * n_emb + per_8bit(n_proj) + 2048
    assert plain == per_8bit(n_emb) + per_8bit(n_proj) + 2048


def test_rows_order_selection_and_dtype():
    est = estimate_memory(gpt2_config(), precond="eigen")
    names = [r.name for r in est.rows]
    assert names[:4] == ["adamw", "adamw_8bit_bnb", "adamw_4bit_torchao", "fp32_shampoo"]
    assert names[4:-2] == [f"q4shampoo_{f}" for f in PRECOND_FORMS]
    assert names[-2:] == ["q4adamw_4bit", "q4adamw_factor"]
    assert est.selected.name == "q4shampoo_eigen"
    # the default factor_upper="refine" keeps a second code of the factor where paper 1 keeps its error feedback
    assert est.row("q4shampoo_cholesky_ef").by_kind["error_feedback"] == 0
    paper1 = estimate_memory(gpt2_config(), factor_upper="feedback").row("q4shampoo_cholesky_ef")
    assert paper1.by_kind["error_feedback"] > 0
    assert paper1.total_bytes == est.row("q4shampoo_cholesky_ef").total_bytes
    assert est.row("q4shampoo_eigen").by_kind["error_feedback"] == 0
    bf16 = estimate_memory(gpt2_config(), dtype="bfloat16")
    assert bf16.param_dtype == "bfloat16"
    # torch AdamW keeps m, v in the parameter dtype; Q4Shampoo's state does not depend on it
    assert bf16.row("adamw").bytes_per_param == pytest.approx(est.row("adamw").bytes_per_param / 2, rel=0.01)
    assert bf16.row("q4shampoo_eigen").total_bytes == est.row("q4shampoo_eigen").total_bytes
    with pytest.raises(KeyError, match="no estimate row"):
        est.row("sgd")


def test_every_config_input_gives_the_same_numbers(tmp_path):
    cfg = gpt2_config()
    cfg.save_pretrained(tmp_path)
    reference = estimate_memory(cfg).row("q4shampoo_cholesky_ef").total_bytes
    inputs = [tmp_path, tmp_path / "config.json", str(tmp_path), cfg.to_dict()]
    for source in inputs:
        assert estimate_memory(source).row("q4shampoo_cholesky_ef").total_bytes == reference, source
    model, description = build_meta_model(tmp_path)
    assert description.startswith("GPT2LMHeadModel")  # a config without `architectures`: causal LM
    assert all(p.device.type == "meta" for p in model.parameters())
    cfg.torch_dtype = "bfloat16"  # a checkpoint's storage dtype does not make the master weights bf16
    model, _ = build_meta_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="without a config.json"):
        estimate_memory(tmp_path)
    with pytest.raises(ValueError, match="Offline, pass a folder"):
        estimate_memory("no-such-org/no-such-model-xyz")
    with pytest.raises(ValueError, match="unknown option"):
        estimate_memory(gpt2_config(), not_an_option=1)
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_memory(frozen)


def test_seven_billion_llama_config_takes_seconds():
    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    start = time.perf_counter()
    est = estimate_memory(cfg)
    elapsed = time.perf_counter() - start
    assert 6.7e9 < est.num_trainable < 6.8e9
    assert est.row("adamw").bytes_per_param == pytest.approx(8.0, abs=1e-3)
    assert est.selected.bytes_per_param < est.row("adamw").bytes_per_param / 2
    assert elapsed < 60, elapsed  # ~1 s on a 2-core CPU; generous for loaded CI machines


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_on_a_local_config_file(tmp_path, capsys):
    gpt2_config().save_pretrained(tmp_path)
    from hf_q4shampoo.cli import main as cli_main

    assert cli_main(["memory", str(tmp_path / "config.json"), "--optim_args", "precond=eigen,max_precond_dim=32"]) == 0
    out = capsys.readouterr().out
    for label in (
        "AdamW (torch)",
        "8-bit AdamW (bitsandbytes)",
        "4-bit AdamW (torchao)",
        "fp32 Shampoo",
        "Q4Shampoo cholesky_ef",
        "Q4Shampoo naive",
        "Q4Shampoo fp32",
    ):
        assert label in out
    assert "**Q4Shampoo eigen**" in out  # the selected form is highlighted
    assert "How each row is computed" in out and "bitsandbytes Optimizer2State" in out

    assert main([str(tmp_path), "--json", "--dtype", "bfloat16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["param_dtype"] == "bfloat16"
    assert {r["name"] for r in data["rows"]} >= {"adamw", "fp32_shampoo", "q4shampoo_cholesky_ef"}


def test_cli_lora_and_errors(tmp_path, capsys):
    pytest.importorskip("peft")
    gpt2_config().save_pretrained(tmp_path)
    assert main([str(tmp_path), "--lora_r", "4", "--lora_target_modules", "c_attn", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 < data["num_trainable"] < data["num_params"] / 10
    # the adapters take the dtype asked for (peft alone would keep them in float32)
    assert main([str(tmp_path), "--lora_r", "4", "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["param_dtype"] == "bfloat16"

    assert main([str(tmp_path / "missing")]) == 2
    assert "Offline, pass a folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--optim_args", "precond=sixbit"]) == 2
    assert "precond" in capsys.readouterr().err
