"""Make the README's memory-report example: the same small GPT-2 trained with AdamW and with Q4Shampoo.

    python docs/memory_report_demo.py                   # ~2-5 minutes on a 2-core CPU, offline; writes runs/
    python docs/memory_report_demo.py --update_docs     # also refresh docs/memory_report_example.*

Each run is its own process, so each one's peak RSS is its own. The AdamW run goes first; the Q4Shampoo
run compares itself with it (``MemoryReportCallback(compare_with=...)``). Both use ``Q4ShampooTrainer``,
which attaches the memory report by default. The runs stay in ``--out`` (``runs/`` is not tracked); with
``--update_docs`` the Q4Shampoo report (``.md``, ``.png``, ``.json``) is copied over the tracked
``docs/memory_report_example.*``.

The model is built from a ``GPT2Config`` (no download); the data are synthetic token sequences (the
memory of the optimizer state does not depend on them).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (imported lazily below): see recipes/

import shutil
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/memory_report_demo", help="folder for the two runs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--optim_args",
        default="update_freq=5,root_freq=10",
        help="Q4Shampoo options (short schedule: statistics and roots happen within the run)",
    )
    p.add_argument("--only", choices=("adamw", "q4shampoo"), help="run one optimizer here (used internally)")
    p.add_argument(
        "--update_docs",
        action="store_true",
        help="copy the Q4Shampoo report over the tracked docs/memory_report_example.*",
    )
    return p


def _dataset(n: int, vocab: int, seq: int):
    """Token sequences of a repeated random motif: learnable, so the loss falls."""
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        motif = torch.randint(0, vocab, (8,), generator=g)
        ids = motif.repeat(seq // 8 + 1)[:seq]
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


OPTIM = {"adamw": "adamw_torch", "q4shampoo": "q4shampoo"}  # run name -> TrainingArguments.optim


def _train(args: argparse.Namespace, run: str) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_q4shampoo import MemoryReportCallback, Q4ShampooTrainer, Q4ShampooTrainingArguments
    from hf_q4shampoo.integrations.report import REPORT_FILES

    torch.manual_seed(0)
    out = Path(args.out)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.n_embd, n_layer=args.n_layer, n_head=8)
    model = GPT2LMHeadModel(config)
    training_args = Q4ShampooTrainingArguments(
        output_dir=str(out / run),
        optim=OPTIM[run],
        optim_args=args.optim_args if run == "q4shampoo" else None,
        learning_rate=1e-3,
        weight_decay=0.01,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    compare = [out / "adamw" / REPORT_FILES["json"]] if run == "q4shampoo" else []
    trainer = Q4ShampooTrainer(
        model=model,
        args=training_args,
        train_dataset=_dataset(args.steps * args.batch, args.vocab, args.seq),
        memory_report=MemoryReportCallback(compare_with=[p for p in compare if p.exists()]),
    )
    trainer.train()
    trainer.save_state()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.only:
        _train(args, args.only)
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--update_docs"]
    for run in OPTIM:
        subprocess.run([sys.executable, __file__, *forwarded, "--only", run], check=True)
    print(f"reports in {args.out}/adamw and {args.out}/q4shampoo")
    if args.update_docs:
        from hf_q4shampoo.integrations.report import REPORT_FILES

        for kind, name in REPORT_FILES.items():
            shutil.copyfile(Path(args.out) / "q4shampoo" / name, DOCS / f"memory_report_example.{kind}")
        # the report names the device and date but not the command or the machine: say them above it
        md = DOCS / "memory_report_example.md"
        title, _, rest = md.read_text().partition("\n")
        note = (
            f"Made by `python docs/memory_report_demo.py` (this report is its Q4Shampoo run) on a "
            f"{os.cpu_count()}-core CPU."
        )
        md.write_text(f"{title}\n\n{note}\n{rest}")
        print(f"copied the Q4Shampoo report to {DOCS}/memory_report_example.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
