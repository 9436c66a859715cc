"""Tiny transformers models and synthetic data sets for the integration tests (no Hub, CPU, seconds).

The causal-LM data are arithmetic progressions modulo the vocabulary (start and stride random), so
a 2-layer GPT-2 learns them in a few dozen steps; the classification data label whether a marker
token occurs. Both are plain ``torch.utils.data.Dataset`` objects of dicts, which Trainer accepts.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

VOCAB = 64
SEQ_LEN = 16
MARKER = 7


class ListDataset(Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def lm_dataset(n: int = 64, seed: int = 0) -> ListDataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        stride = int(torch.randint(1, 3, (1,), generator=g))
        ids = (start + stride * torch.arange(SEQ_LEN)) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": ids.clone()})
    return ListDataset(rows)


def cls_dataset(n: int = 64, seed: int = 0) -> ListDataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(10, VOCAB, (SEQ_LEN,), generator=g)
        label = i % 2
        if label:
            ids[int(torch.randint(1, SEQ_LEN, (1,), generator=g))] = MARKER
        ids[0] = 2  # [CLS]-like start token
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": torch.tensor(label)}
        )
    return ListDataset(rows)


def tiny_gpt2(n_embd: int = 32, n_layer: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # no dropout: runs are reproducible step by step
    )
    return GPT2LMHeadModel(config)


def tiny_bert_classifier(hidden: int = 32, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


#: Short Shampoo schedule so statistics and roots are exercised within a few steps.
FAST = "update_freq=1,root_freq=2"


def training_args(output_dir, cls=None, **overrides):
    """TrainingArguments for a short, quiet, CPU-only, reproducible run."""
    if cls is None:
        from transformers import TrainingArguments as cls
    values = dict(
        output_dir=str(output_dir),
        optim="q4shampoo",
        optim_args=FAST,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        max_steps=8,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return cls(**values)


def q4shampoo_trainer(output_dir, n_embd: int = 32, rows: int = 8, trainer_kwargs=None, **arg_overrides):
    """``Q4ShampooTrainer`` on a tiny GPT-2 and ``rows`` LM rows, batch 4, Q4Shampoo on the FAST schedule;
    ``arg_overrides`` go to :func:`training_args`, ``trainer_kwargs`` to the trainer (e.g. ``memory_report``)."""
    from hf_q4shampoo import Q4ShampooTrainer, Q4ShampooTrainingArguments

    values = dict(cls=Q4ShampooTrainingArguments, per_device_train_batch_size=4)
    args = training_args(output_dir, **{**values, **arg_overrides})
    return Q4ShampooTrainer(
        model=tiny_gpt2(n_embd=n_embd), args=args, train_dataset=lm_dataset(rows), **(trainer_kwargs or {})
    )


def tiny_tokenizer():
    """A word-level fast tokenizer over ``t0 ... t{VOCAB-5}`` plus four special tokens (no files, no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"t{i}" for i in range(VOCAB - len(specials))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def text_rows(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """The progressions of :func:`lm_dataset` as text for ``tiny_tokenizer`` (ids 4 .. VOCAB-1)."""
    g = torch.Generator().manual_seed(seed)
    words = VOCAB - 4
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, words, (1,), generator=g))
        stride = int(torch.randint(1, 3, (1,), generator=g))
        rows.append({"text": " ".join(f"t{(start + stride * i) % words}" for i in range(SEQ_LEN - 2))})
    return rows


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def nested_tensors(value):
    """The tensors in a (nested) dict / list / tuple, e.g. an optimizer state, in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from nested_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from nested_tensors(v)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run these small models on one intra-op thread, restored afterwards.

    On a shared 2-core machine, two OpenMP threads competing with other processes made the same
    6 steps ~30-90x slower (spin-waiting); one thread costs little at these sizes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
