"""TRL's SFTTrainer with ``optim="q4shampoo"`` (issue #3, item 7). Skipped when TRL is not installed."""

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (optional): SFTTrainer integration not tested")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from hf_q4shampoo import Q4Shampoo  # noqa: E402
from hf_q4shampoo.memory import unwrap_optimizer  # noqa: E402

from tiny_hf import FAST, one_torch_thread, text_rows, tiny_gpt2, tiny_tokenizer  # noqa: E402,F401

pytestmark = pytest.mark.heavy

# renamed from gradient_checkpointing in later 5.x releases
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
ARGS = [
    "--optim",
    "q4shampoo",
    "--optim_args",
    FAST,
    "--max_steps",
    "6",
    "--learning_rate",
    "1e-2",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--use_cpu",
    "true",
    "--bf16",
    "false",
    f"--{_CHECKPOINTING}",
    "false",
    "--save_strategy",
    "no",
    "--max_length",
    "32",
    "--disable_tqdm",
    "true",
]


def _train(trainer_cls, config, peft_config=None):
    model = tiny_gpt2()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(text_rows()),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert isinstance(unwrap_optimizer(trainer.optimizer), Q4Shampoo)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    return trainer, base, losses


def test_sft_trainer_with_stock_sft_config_and_lora(tmp_path):
    (config,) = HfArgumentParser(trl.SFTConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *ARGS])
    assert config.optim == "q4shampoo"
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    trainer, base, _ = _train(trl.SFTTrainer, config, lora)
    optimized = {id(p) for g in unwrap_optimizer(trainer.optimizer).param_groups for p in g["params"]}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert optimized and all("lora_" in names[i] for i in optimized)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zero-initialised B has been trained
    frozen = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in trainer.model.named_parameters()
        if not p.requires_grad
    }
    assert set(frozen) == set(base) and all(torch.equal(frozen[n], p) for n, p in base.items())


def test_q4shampoo_sft_classes_without_registration(tmp_path):
    from hf_q4shampoo.integrations.transformers import Q4ShampooSFTConfig, Q4ShampooSFTTrainer

    (config,) = HfArgumentParser(Q4ShampooSFTConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *ARGS])
    assert type(config.optim) is str and config.optim == "q4shampoo"
    assert isinstance(config, trl.SFTConfig) and config.dataset_text_field == "text"  # SFT fields and defaults kept
    _, _, losses = _train(Q4ShampooSFTTrainer, config)
    assert sum(losses[-2:]) < sum(losses[:2])
