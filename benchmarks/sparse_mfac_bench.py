"""Step time and optimizer memory of SparseMFAC against dense M-FAC (same window m) and fused AdamW.

    python benchmarks/sparse_mfac_bench.py --out DIR [--m 1024] [--k_fraction 0.01] [--steps 20]
    python benchmarks/sparse_mfac_bench.py --smoke --out DIR      # tiny model, CPU, seconds

Issue 17, item 3 (step time part). The model is the all-MiniLM-L6-v2 architecture built from a config
(BertForSequenceClassification: 6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522; 22.7M
parameters, random weights, nothing downloaded), trained on one fixed random batch (``--batch`` x
``--seq`` tokens), all parameters in one group (one flattened vector, as the paper does). Optimizers, in
this order, each on a fresh copy of the model in the same process:

``adamw``          torch AdamW, ``fused=True``
``sparse_mfac``    SparseMFAC, top-k at ``--k_fraction`` with error feedback, window ``--m``
``lowrank_mfac``   SparseMFAC ``variant="lowrank"``, rank ``--rank`` (only with ``--optimizers``)
``dense_mfac``     SparseMFAC with ``k_fraction=1`` (full fp32 rows: dense M-FAC), window ``--dense_m``
                   (default ``--m``; an m x d fp32 window is 93 GB at m = 1024 on this model)
``q4shampoo``      Q4Shampoo defaults (only with ``--optimizers``)

Per optimizer: median wall time of a training step (forward, backward, ``optimizer.step()``) and of
``optimizer.step()`` alone over ``--steps`` steps after ``--warmup`` steps (the device is synchronised
around each), optimizer state by kind (``hf_q4shampoo.memory``, from the live state tensors) and the
peak allocated device memory. An optimizer that runs out of memory is recorded as such and the run goes
on. Prints a table and writes ``sparse_mfac_bench.json`` (with the command, machine, versions and date)
under ``--out``. No results are recorded in this file: they belong in docs/results.md with the command,
machine and date that produced them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ALL = ("adamw", "sparse_mfac", "lowrank_mfac", "dense_mfac", "q4shampoo")
DEFAULT = ("adamw", "sparse_mfac", "dense_mfac")


def build_model(smoke: bool, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if smoke:
        config = BertConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
        )
    else:  # all-MiniLM-L6-v2's architecture
        config = BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
            num_labels=2,
        )
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # the same step every repetition
    return BertForSequenceClassification(config)


def make_optimizer(name: str, params: list[torch.nn.Parameter], a: argparse.Namespace, device: torch.device):
    from hf_q4shampoo import Q4Shampoo, SparseMFAC

    if name == "adamw":
        return torch.optim.AdamW(params, lr=a.lr_adamw, fused=device.type in ("cuda", "cpu"))
    mfac = dict(lr=a.lr, damp=a.damp, momentum=a.momentum)
    if name == "sparse_mfac":
        return SparseMFAC(params, m=a.m, k_fraction=a.k_fraction, **mfac)
    if name == "lowrank_mfac":
        return SparseMFAC(params, m=a.m, variant="lowrank", rank=a.rank, **mfac)
    if name == "dense_mfac":
        return SparseMFAC(params, m=a.dense_m or a.m, k_fraction=1.0, **mfac)
    if name == "q4shampoo":
        return Q4Shampoo(params, lr=a.lr_adamw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(ALL)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_one(name: str, a: argparse.Namespace, device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    from hf_q4shampoo.memory import optimizer_state_bytes

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(a.smoke).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    row: dict[str, Any] = {"optimizer": name, "num_params": sum(p.numel() for p in params)}
    try:
        opt = make_optimizer(name, params, a, device)
        step_ms, opt_ms, losses = [], [], []
        for i in range(a.warmup + a.steps):
            _sync(device)
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            _sync(device)
            mid = time.perf_counter()
            if a.profile and i == a.warmup + a.steps - 1:  # the last step, by operator (--profile)
                with torch.profiler.profile() as prof:
                    opt.step()
                    _sync(device)
                sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                row["profile"] = prof.key_averages().table(sort_by=sort, row_limit=15)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            end = time.perf_counter()
            losses.append(float(loss.detach()))
            if i >= a.warmup:
                step_ms.append(1e3 * (end - start))
                opt_ms.append(1e3 * (end - mid))
        report = optimizer_state_bytes(opt)
        row.update(
            status="ok",
            step_ms_median=statistics.median(step_ms),
            optimizer_step_ms_median=statistics.median(opt_ms),
            optimizer_step_ms_max=max(opt_ms),
            state_bytes=report.total,
            state_bytes_per_param=report.bytes_per_param,
            state_by_kind=dict(report.by_kind),
            peak_allocated_bytes=_peak(device),
            first_loss=losses[0],
            last_loss=losses[-1],
        )
        if name.endswith("mfac"):
            row["config"] = opt.config.to_dict()
        del opt
    except torch.OutOfMemoryError as err:
        row.update(status="out_of_memory", error=str(err).splitlines()[0], peak_allocated_bytes=_peak(device))
    del model, params
    gc.collect()
    return row


def window_bytes(row: dict[str, Any]) -> int | None:
    """Window values + positions + error accumulator (issue 17's accounting), from the measured kinds."""
    kinds = row.get("state_by_kind")
    if not kinds:
        return None
    return kinds["statistics"] + kinds["indices"] + kinds["error_feedback"]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["optimizer"]: r for r in rows if r.get("status") == "ok"}
    out: dict[str, Any] = {}
    sparse, dense = by.get("sparse_mfac"), by.get("dense_mfac")
    if sparse and dense:
        out["step_time_sparse_over_dense"] = sparse["step_ms_median"] / dense["step_ms_median"]
        same_m = sparse["config"]["m"] == dense["config"]["m"]
        out["windows_have_same_m"] = same_m
        # dense M-FAC's window is its fp32 rows (statistics); its error accumulator is all zeros
        out["window_sparse_over_dense"] = window_bytes(sparse) / dense["state_by_kind"]["statistics"]
    if sparse and "adamw" in by:
        out["step_time_sparse_over_adamw"] = sparse["step_ms_median"] / by["adamw"]["step_ms_median"]
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    mib = 2**20
    print(
        f"{'optimizer':<14} {'step ms':>9} {'opt.step ms':>12} {'state MiB':>10} {'B/param':>8} "
        f"{'window MiB':>11} {'peak MiB':>9}  status"
    )
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['optimizer']:<14} {'':>9} {'':>12} {'':>10} {'':>8} {'':>11} {'':>9}  {r.get('status')}")
            continue
        win = window_bytes(r) if r["optimizer"].endswith("mfac") else None
        peak = r["peak_allocated_bytes"]
        print(
            f"{r['optimizer']:<14} {r['step_ms_median']:>9.2f} {r['optimizer_step_ms_median']:>12.2f} "
            f"{r['state_bytes'] / mib:>10.1f} {r['state_bytes_per_param']:>8.2f} "
            f"{'' if win is None else f'{win / mib:.1f}':>11} {'' if peak is None else f'{peak / mib:.0f}':>9}  ok"
        )


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=False
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001  (metadata only)
        pass
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="sparse_mfac_bench_out")
    p.add_argument("--smoke", action="store_true", help="tiny BERT, 3 steps, m=4: checks the script, measures nothing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--optimizers", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(ALL)}")
    p.add_argument("--m", type=int, default=1024, help="window of SparseMFAC (EFCP's BERT runs: 1024)")
    p.add_argument("--dense_m", type=int, default=None, help="window of dense M-FAC (default: --m)")
    p.add_argument("--k_fraction", type=float, default=0.01)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--damp", type=float, default=5e-5)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-5, help="M-FAC learning rate (EFCP's BERT runs: 2e-5)")
    p.add_argument("--lr_adamw", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="profile the last step of each optimizer (operator table)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (CPU runs only; on a shared 2-core machine more threads made steps "
        "~100x slower through OpenMP spin-waiting)",
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.m, a.dense_m, a.batch, a.seq, a.steps, a.warmup = 4, None, 4, 16, 3, 1
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {', '.join(ALL)}")
    g = torch.Generator().manual_seed(0)
    vocab = build_model(a.smoke).config.vocab_size
    batch = {
        "input_ids": torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(device),
        "attention_mask": torch.ones(a.batch, a.seq, dtype=torch.long).to(device),
        "labels": torch.randint(0, 2, (a.batch,), generator=g).to(device),
    }
    rows = []
    for name in names:
        rows.append(run_one(name, a, device, batch))
        print(f"done: {name} ({rows[-1]['status']})", flush=True)
    result = {
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else f"main({argv!r})",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "settings": vars(a),
        "rows": rows,
        "summary": summary(rows),
    }
    print_table(rows)
    for key, value in result["summary"].items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_mfac_bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'sparse_mfac_bench.json'}")
    return result


if __name__ == "__main__":
    main()
