"""Two small CPU tasks of another kind than the hard-conditioning family, to check a default change (issue 14).

* ``teacher``: the teacher-student regression of ``tests/test_optimizer.py`` (tanh MLP 128-128-64, inputs of
  condition number 1e4 in a random basis, noisy targets; 200 steps of 256; final full-data loss).
* ``lm``: a byte-level causal LM (GPT-2 layout, 2 layers x 128, 4 heads, context 64) on local text: the
  sources of a fixed list of Python standard-library modules (~1 MB; until 2026-11-30 also this repository's
  Markdown files, which changed from commit to commit), split 90/10 into training and validation by 2,000-byte
  chunks; 400 steps of 16 sequences, validation loss at the end.

Every optimizer runs each lr of its grid and each seed; the table shows each one's best lr (mean over seeds).
Q4Shampoo runs set ``total_steps`` (the ``"auto"`` schedule: statistics every 2 / 4 steps, roots every 20 / 40
for the two tasks) unless ``--schedule`` says otherwise.

    python benchmarks/quality_cpu.py --json docs/results/quality_cpu.json
    python benchmarks/quality_cpu.py --tasks lm --optim "x:precond=eigen"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_result  # noqa: E402

from hf_q4shampoo import Q4Shampoo  # noqa: E402
from hf_q4shampoo.config import parse_optim_args  # noqa: E402

STDLIB = (
    "argparse",
    "dataclasses",
    "typing",
    "inspect",
    "collections/__init__",
    "json/decoder",
    "textwrap",
    "functools",
    "pathlib",
    "enum",
    "logging/__init__",
    "unittest/case",
    "difflib",
    "subprocess",
    "threading",
)

OPTIMIZERS = {
    "adamw": "adamw",
    "fp32/32": "precond=fp32;first_order_bits=32",
    "cholesky_ef/4 (default)": "",
    "refine_col/4new": "factor_upper=refine;factor_scaling=column;first_order_v=factored;first_order_m_map=linear2",
}


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------


def _teacher_problem(seed, n=2048, d=128, h=128, k=64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = torch.randn(n, d, generator=g) @ (q * torch.logspace(0, -2, d)) @ q.T * 3
    w1 = torch.randn(h, d, generator=g) / math.sqrt(d) * 3
    w2 = torch.randn(k, h, generator=g) / math.sqrt(h)
    y = torch.tanh(x @ w1.T) @ w2.T
    return x, y + 0.1 * y.std() * torch.randn(y.shape, generator=g)


def teacher(make_opt, seed, steps=200, batch=256) -> float:
    x, y = _teacher_problem(seed)
    torch.manual_seed(seed + 1)
    net = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    opt = make_opt(net.parameters(), steps)
    g = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = ((net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((net(x) - y) ** 2).mean())


_TEXT: tuple[torch.Tensor, torch.Tensor] | None = None


def _text() -> tuple[torch.Tensor, torch.Tensor]:
    global _TEXT
    if _TEXT is None:
        # Python sources only: this repository's Markdown was part of the text until 2026-11-30 and changed with
        # every commit that touched the docs, so runs made at different commits saw different data
        lib = Path(json.__file__).resolve().parents[1]
        parts = [(lib / f"{name}.py").read_bytes() for name in STDLIB]
        data = b"\n".join(parts)
        chunks = [data[i : i + 2000] for i in range(0, len(data), 2000)]
        val = b"".join(c for i, c in enumerate(chunks) if i % 10 == 9)
        train = b"".join(c for i, c in enumerate(chunks) if i % 10 != 9)
        _TEXT = (
            torch.frombuffer(bytearray(train), dtype=torch.uint8).long(),
            torch.frombuffer(bytearray(val), dtype=torch.uint8).long(),
        )
    return _TEXT


def lm(make_opt, seed, steps=400, batch=16, ctx=64, trace: list | None = None) -> float:
    """Validation loss at the end; ``trace`` (a list) receives the mean training loss of every 10 steps."""
    import transformers

    train, val = _text()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=256,
        n_positions=ctx,
        n_embd=128,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    opt = make_opt(model.parameters(), steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    )
    g = torch.Generator().manual_seed(100 + seed)
    window: list[float] = []
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - ctx - 1, (batch,), generator=g)
        ids = torch.stack([train[s : s + ctx] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        if trace is not None:
            window.append(loss.item())
            if len(window) == 10:
                trace.append(round(sum(window) / 10, 3))
                window = []
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        n = (val.numel() - 1) // ctx
        ids = val[: n * ctx].reshape(n, ctx)
        losses = [float(model(input_ids=ids[i : i + 64], labels=ids[i : i + 64]).loss) for i in range(0, n, 64)]
    return sum(losses) / len(losses)


TASKS = {
    "teacher": (teacher, (3e-3, 1e-2, 3e-2), (3e-3, 1e-2, 3e-2, 1e-1)),
    "lm": (lm, (1e-3, 3e-3, 1e-2), (1e-3, 3e-3, 1e-2)),
}


def _distributed_shampoo(params, lr: float, schedule: dict, beta2: float, **overrides):
    """Distributed Shampoo (facebookresearch/optimizers, fp32, Adam grafting) on the Q4Shampoo runs' root schedule:
    roots every ``root_freq`` steps from step ``root_freq`` on, statistics at every step (its only choice: give the
    Q4Shampoo runs ``update_freq=1`` to compare like with like). Not a dependency: its ``distributed_shampoo``
    package must be importable (e.g. on PYTHONPATH)."""
    try:
        import distributed_shampoo as ds
    except ImportError as err:
        raise SystemExit(
            "dshampoo: Distributed Shampoo is not importable; put the distributed_shampoo package of "
            "github.com/facebookresearch/optimizers on PYTHONPATH"
        ) from err
    root_freq = schedule.get("root_freq")
    if not isinstance(root_freq, int) or schedule.get("update_freq") != 1:
        raise SystemExit("dshampoo: give --schedule with update_freq=1 and an integer root_freq (its schedule)")
    options = dict(
        lr=lr,
        betas=(0.9, beta2),
        epsilon=1e-12,
        weight_decay=0.0,
        max_preconditioner_dim=1024,
        precondition_frequency=root_freq,
        start_preconditioning_step=root_freq,
        grafting_config=ds.AdamPreconditionerConfig(beta2=0.999, epsilon=1e-8),
    )
    return ds.DistributedShampoo(params, **{**options, **overrides})  # overrides: its keywords (lm_gap.py's switches)


def maker(spec: str, lr: float, schedule: dict):
    if spec == "adamw":
        return lambda params, steps: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if spec.startswith("dshampoo"):  # "dshampoo" or "dshampoo;beta2=0.95" (its factor EMA; default 0.999)
        beta2 = float(spec.split("beta2=", 1)[1]) if "beta2=" in spec else 0.999
        return lambda params, steps: _distributed_shampoo(params, lr, schedule, beta2)
    options = parse_optim_args(spec.replace(";", ","))
    return lambda params, steps: Q4Shampoo(params, lr=lr, **{"total_steps": steps, **schedule, **options})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="teacher,lm")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--optim", action="append", default=[], help="NAME:key=value;... (replaces the default set)")
    ap.add_argument("--lrs", default=None, help="comma-separated lr grid for every optimizer (default: the task's)")
    ap.add_argument("--schedule", default="", help="Q4Shampoo options for every Shampoo run, e.g. update_freq=1")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    optimizers = dict(OPTIMIZERS)
    if args.optim:
        optimizers = dict(o.split(":", 1) for o in args.optim)
    schedule = parse_optim_args(args.schedule.replace(";", ","))
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    t0 = time.time()
    for task in args.tasks.split(","):
        fn, grid, adam_grid = TASKS[task]
        if args.lrs:
            grid = adam_grid = tuple(float(v) for v in args.lrs.split(","))
        results[task] = {}
        for name, spec in optimizers.items():
            per_lr = {}
            for lr in adam_grid if spec == "adamw" else grid:
                per_lr[f"{lr:g}"] = [fn(maker(spec, lr, schedule), s) for s in seeds]
            best = min(per_lr, key=lambda k: sum(per_lr[k]) / len(seeds))
            vals = per_lr[best]
            mean = sum(vals) / len(vals)
            sd = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
            results[task][name] = {"best_lr": float(best), "mean": mean, "sd": sd, "runs": per_lr}
            print(
                f"{task:8s} {name:28s} best lr {best:6s} {mean:.4f} +- {sd:.4f}  ({time.time() - t0:.0f} s)", flush=True
            )
    print()
    for task, rows in results.items():
        print(f"| {task} | best lr | loss (mean +- sd over seeds {args.seeds}) |\n|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['best_lr']:g} | {r['mean']:.4f} +- {r['sd']:.4f} |")
        print()
    if args.json:
        write_result(args.json, optimizers=optimizers, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
