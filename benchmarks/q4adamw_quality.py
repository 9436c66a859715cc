"""CPU quality check of Q4AdamW (issue 15): fp32 AdamW vs Q4AdamW "4bit" vs "factor" on quality_cpu.py's tasks.

The tasks are those of ``benchmarks/quality_cpu.py`` (``teacher``: an ill-conditioned teacher-student
regression, final full-data MSE; ``lm``: a 2 x 128 byte-level GPT-2 on local text, validation loss), run
unchanged. Every optimizer runs the same learning rates and seeds, with weight decay 0 (as quality_cpu.py's
AdamW); ``torch.optim.AdamW`` is the fp32 reference. The table gives, per task and lr, each optimizer's mean
loss over the seeds and its relative difference to AdamW's at the same lr (issue 15's target: within 0.5%).

    python benchmarks/q4adamw_quality.py --json docs/results/q4adamw_quality_cpu.json
    python benchmarks/q4adamw_quality.py --tasks teacher --seeds 0,1,2 --optimizers adamw,q4adamw_4bit
    python benchmarks/q4adamw_quality.py --tasks teacher --decay ...   (lr decayed linearly to 0, as the Trainer does)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_result  # noqa: E402
from quality_cpu import lm, teacher  # noqa: E402

from hf_q4shampoo import Q4AdamW  # noqa: E402
from hf_q4shampoo.bench import OPTIMIZERS as BENCH_OPTIMIZERS  # noqa: E402


def _bench(name: str):
    """The benchmark's factory for ``name`` (``hf_q4shampoo.bench``: the peers are imported only when asked for),
    with weight decay 0 as every optimizer here."""
    return lambda params, lr: BENCH_OPTIMIZERS[name][0](
        [{"params": list(params), "weight_decay": 0.0}], lr, torch.device("cpu"), {}
    )


#: name -> factory(params, lr); the peers need torchao / bitsandbytes importable (e.g. PYTHONPATH=<peer wheels>)
OPTIMIZERS = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    "q4adamw_4bit": lambda params, lr: Q4AdamW(params, lr=lr, weight_decay=0.0),
    "q4adamw_factor": lambda params, lr: Q4AdamW(params, lr=lr, weight_decay=0.0, variant="factor"),
    "q4adamw_4bit_linear2": lambda params, lr: Q4AdamW(params, lr=lr, weight_decay=0.0, m_map="linear2"),
    "torchao_4bit": _bench("adamw_4bit"),
    "bnb_8bit": _bench("adamw_8bit"),
}
#: task -> (function, default lrs): AdamW's best lrs in docs/results/quality_cpu_{teacher,lm}.json
TASKS = {"teacher": (teacher, (1e-2, 3e-2)), "lm": (lm, (3e-3,))}


def _make(name: str, params, lr: float, steps: int, decay: bool) -> torch.optim.Optimizer:
    """The optimizer ``name``; with ``decay`` its lr falls linearly to 0 over ``steps`` (a LambdaLR stepped by a
    post-step hook, since the tasks call ``step()`` only)."""
    opt = OPTIMIZERS[name](params, lr)
    if decay:
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))
        opt.register_step_post_hook(lambda *_: schedule.step())
    return opt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="teacher,lm")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--optimizers", default="adamw,q4adamw_4bit,q4adamw_factor,q4adamw_4bit_linear2")
    ap.add_argument("--lrs", default=None, help="comma-separated lrs for every task (default: the task's)")
    ap.add_argument(
        "--decay",
        action="store_true",
        help="lr falls linearly to 0 over the run (the Trainer's default schedule); default: constant lr",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        ap.error(f"--optimizers: unknown {unknown}; allowed: {', '.join(OPTIMIZERS)}")
    results: dict = {}
    t0 = time.time()
    for task in args.tasks.split(","):
        fn, lrs = TASKS[task]
        if args.lrs:
            lrs = tuple(float(v) for v in args.lrs.split(","))
        results[task] = {}
        for lr in lrs:
            rows = results[task][f"{lr:g}"] = {}
            for name in names:
                runs = [
                    fn(lambda params, steps, name=name, lr=lr: _make(name, params, lr, steps, args.decay), s)
                    for s in seeds
                ]
                rows[name] = {"runs": runs, "mean": sum(runs) / len(runs)}
                print(
                    f"{task:8s} lr {lr:<6g} {name:22s} {rows[name]['mean']:.4f} {runs}  ({time.time() - t0:.0f} s)",
                    flush=True,
                )
            base = rows.get("adamw")
            for row in rows.values():
                row["vs_adamw"] = row["mean"] / base["mean"] - 1.0 if base else None
    print()
    for task, by_lr in results.items():
        print(f"| {task} | lr | loss (mean over seeds {args.seeds}) | vs AdamW |\n|---|---|---|---|")
        for lr, rows in by_lr.items():
            for name, r in rows.items():
                rel = f"{100 * r['vs_adamw']:+.2f}%" if r["vs_adamw"] is not None else "-"
                print(f"| {name} | {lr} | {r['mean']:.4f} | {rel} |")
        print()
    if args.json:
        write_result(args.json, seconds=round(time.time() - t0), results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
