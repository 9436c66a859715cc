"""Instruction data for chat-template fine-tuning, with the loss on the response tokens only.

* :func:`generate_tasks` makes tasks whose answers can be checked exactly (arithmetic, sorting,
  maximum of a list, upper-casing) — the offline default, scored by exact match after greedy decoding.
* :func:`read_instruction_file` reads JSON / JSONL of ``{"instruction", "input", "output"}`` or
  ``{"messages": [...]}`` records (plain ``json``: no ``datasets`` needed).
* :func:`encode_chat` renders a conversation with the tokenizer's chat template and masks everything
  but the assistant turns (labels = -100), so the model is not trained to predict the prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .args import RecipeArgumentError
from .data import pad_sequences

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "CHATML_TEMPLATE",
    "generate_tasks",
    "record_to_messages",
    "read_instruction_file",
    "ensure_chat_template",
    "encode_chat",
    "ChatCollator",
    "generate_answers",
    "stop_token_ids",
]

#: Label of tokens that take no part in the loss (torch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100

#: ChatML, the template SmolLM2 uses; given to tokenizers that have none (e.g. one trained on the fly).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "apple river stone cloud garden silver window forest candle music ocean paper winter yellow bridge "
    "morning planet rabbit little quiet orange summer castle engine pocket shadow thunder violet wooden"
).split()


def _numbers(rng: random.Random, low: int = 3, high: int = 6) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(low, high))]


def _arithmetic(rng: random.Random) -> dict[str, str]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 20)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {
        "instruction": "Compute the result. Answer with the number only.",
        "input": f"{a} {op} {b}",
        "output": str(value),
    }


def _sorting(rng: random.Random) -> dict[str, str]:
    values = _numbers(rng)
    return {
        "instruction": "Sort the numbers in ascending order. Answer with the sorted list only.",
        "input": ", ".join(map(str, values)),
        "output": ", ".join(map(str, sorted(values))),
    }


def _maximum(rng: random.Random) -> dict[str, str]:
    values = _numbers(rng)
    return {
        "instruction": "What is the largest number in the list? Answer with the number only.",
        "input": ", ".join(map(str, values)),
        "output": str(max(values)),
    }


def _uppercase(rng: random.Random) -> dict[str, str]:
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))
    return {
        "instruction": "Rewrite the text in upper case. Answer with the rewritten text only.",
        "input": text,
        "output": text.upper(),
    }


#: task name -> generator of one ``{"instruction", "input", "output"}`` record.
TASKS = {"arithmetic": _arithmetic, "sorting": _sorting, "max": _maximum, "uppercase": _uppercase}


def generate_tasks(n: int, seed: int, tasks: Sequence[str] = tuple(TASKS)) -> list[dict[str, str]]:
    """``n`` records cycling through ``tasks``; different seeds give different (disjoint in practice) sets."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise RecipeArgumentError(f"unknown task(s) {unknown}; choose among {', '.join(TASKS)}.")
    rng = random.Random(seed)
    return [{**TASKS[tasks[i % len(tasks)]](rng), "task": tasks[i % len(tasks)]} for i in range(n)]


def record_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record as chat messages: ``messages`` as given, or instruction (+ input) -> user, output -> assistant."""
    if "messages" in record and record["messages"] is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        if not any(m["role"] == "assistant" for m in messages):
            raise RecipeArgumentError("a 'messages' record has no assistant turn to learn from.")
        return messages
    if "instruction" in record and "output" in record:
        prompt = record["instruction"].strip()
        if record.get("input"):
            prompt += "\n\n" + str(record["input"]).strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["output"]).strip()}]
    raise RecipeArgumentError(
        f"a record with keys {sorted(record)} is neither {{'instruction', 'input', 'output'}} "
        "nor {'messages': [...]}."
    )


def read_instruction_file(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``.json`` (a list of objects) or ``.jsonl`` (one object per line) file."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in handle if line.strip()]
        else:
            records = json.load(handle)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RecipeArgumentError(f"{path} must hold a list of JSON objects (or one object per line in .jsonl).")
    if not records:
        raise RecipeArgumentError(f"{path} holds no records.")
    return records


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ChatML (adding its two special tokens if needed)."""
    if getattr(tokenizer, "chat_template", None):
        return
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        raise RecipeArgumentError(
            "the tokenizer has no chat template and no ChatML tokens; use an instruct/chat model or a tokenizer "
            "with a chat template (--tokenizer_name)."
        )
    tokenizer.chat_template = CHATML_TEMPLATE


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # the template writes any BOS itself: adding special tokens here would double it
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, str]], max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids and labels of a conversation; labels are -100 everywhere except on assistant turns.

    Each assistant turn is located by rendering the conversation up to it with and without the turn;
    the prompt part and the answer part are tokenised separately, which is also how generation sees
    them (a rendered prompt, then new tokens). Templates that rewrite earlier turns when a new one is
    added are refused: their loss mask would be ambiguous.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise RecipeArgumentError(
                "the chat template renders earlier turns differently once a later turn is added, so the prompt "
                "tokens cannot be masked reliably; use single-turn records or another template."
            )
        prompt_ids = _ids(tokenizer, prompt[len(rendered) :])
        answer_ids = _ids(tokenizer, full[len(prompt) :])
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        rendered = full
    if not rendered:
        raise RecipeArgumentError("a conversation has no assistant turn to learn from.")
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


class ChatCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100) and builds the attention mask."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequences([f["input_ids"] for f in features], self.pad_token_id)
        labels = pad_sequences([f["labels"] for f in features], IGNORE_INDEX)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end an answer: the tokenizer's and the model's end of sequence, and the chat template's
    end-of-turn token (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), which a model fine-tuned by
    :func:`encode_chat` learns to emit after each answer even where the tokenizer's eos is another token."""
    ids: list[int] = []
    candidates = [tokenizer.eos_token_id]
    if model is not None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
        candidates += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}]
    answer = _render(tokenizer, messages, False)[len(_render(tokenizer, messages[:1], True)) :]
    after = answer.partition("ANSWER")[2]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if after:
        first = _ids(tokenizer, after)[:1]
        candidates += [t for t in first if t in special]
    for t in candidates:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return ids


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy answers to chat prompts (each a message list ending with the user turn), decoded and stripped."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [
            _ids(tokenizer, _render(tokenizer, list(p), add_generation_prompt=True))
            for p in prompts[start : start + batch_size]
        ]
        input_ids = pad_sequences(batch, pad_id, side="left").to(device)  # left: new tokens line up at the end
        lengths = torch.tensor([len(b) for b in batch], device=device)
        positions = torch.arange(input_ids.shape[1], device=device)[None, :]
        attention_mask = (positions >= input_ids.shape[1] - lengths[:, None]).long()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=stops,
        )
        for row in out[:, input_ids.shape[1] :].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            row = row[: ends[0]] if ends else row  # rows that finished early are padded after their stop
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return answers
