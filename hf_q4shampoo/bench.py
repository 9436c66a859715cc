"""Speed and memory benchmark: the same model and batches under several optimizers, in one process.

The command line, the model and what is reported are described in ``bench_cli.DESCRIPTION`` (its ``--help``),
which lives beside the argument parser so that ``q4shampoo bench --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .bench_cli import parse_args
from .config import parse_optim_args
from .memory import optimizer_state_bytes
from .optimizer import Q4Shampoo
from .q4adamw import Q4AdamW

__all__ = ["OPTIMIZERS", "run_benchmark", "main"]


def _graph_pool_bytes() -> int:
    """Bytes of the CUDA caching allocator's segments in private pools (CUDA graphs' memory)."""
    return sum(
        seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)
    )


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups, lr, device, _opts):
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def _bnb_8bit(groups, lr, _device, _opts):
    import bitsandbytes as bnb  # noqa: PLC0415 - optional peer

    return bnb.optim.AdamW8bit(groups, lr=lr)


def _ao(bits: int):
    def make(groups, lr, _device, _opts):
        try:
            from torchao.optim import AdamW4bit, AdamW8bit  # noqa: PLC0415 - optional peer
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit  # noqa: PLC0415

        return (AdamW4bit if bits == 4 else AdamW8bit)(groups, lr=lr)

    return make


def _q4(**fixed):
    def make(groups, lr, _device, opts):
        return Q4Shampoo(groups, lr=lr, **{**opts, **fixed})

    return make


def _q4adamw(**fixed):
    def make(groups, lr, _device, _opts):  # Q4Shampoo's --optim_args do not apply
        return Q4AdamW(groups, lr=lr, **fixed)

    return make


#: name -> (factory(groups, lr, device, q4shampoo_options), description)
OPTIMIZERS: dict[str, tuple[Callable, str]] = {
    "adamw": (_adamw, "torch AdamW (fused on CUDA), fp32 states"),
    "adamw_8bit": (_bnb_8bit, "bitsandbytes AdamW8bit"),
    "adamw_4bit": (_ao(4), "torchao AdamW4bit"),
    "adamw_8bit_ao": (_ao(8), "torchao AdamW8bit"),
    "q4shampoo": (_q4(), "Q4Shampoo with --optim_args (default: cholesky_ef)"),
    "shampoo_fp32": (_q4(precond="fp32", first_order_bits=32), "our fp32 Shampoo (fp32 factors/roots, fp32 Adam)"),
    "q4shampoo_eigen": (_q4(precond="eigen"), "Q4Shampoo precond=eigen"),
    "q4shampoo_naive": (_q4(precond="naive"), "Q4Shampoo precond=naive"),
    "q4adamw": (_q4adamw(), "Q4AdamW 4bit (paper 3: m B128/DE, v rank-1 zero-free linear)"),
    "q4adamw_factor": (_q4adamw(variant="factor"), "Q4AdamW factor (paper 3's 4-bit Factor: factored v)"),
    "q4adamw_linear2": (_q4adamw(m_map="linear2"), "Q4AdamW 4bit with m in Linear-2"),
    "q4adamw_eager": (_q4adamw(cuda_graph=False), "Q4AdamW 4bit, every step eager (no CUDA graph)"),
}


def _build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: PLC0415

    cfg = GPT2Config(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        vocab_size=args.vocab,
        n_positions=max(args.seq, 1024),
        loss_type="ForCausalLMLoss",
    )
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(cfg).to(device)


def _batches(args: argparse.Namespace, device: torch.device, count: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(count)]


def sync(device: torch.device) -> None:
    """Wait for ``device`` (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp32 weights), plain fp32 on CPU."""
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def timed_train_step(
    model: Any, opt: Any, x: torch.Tensor, clock: Any, autocast: Any, host_ms: list[float], set_to_none: bool = True
) -> torch.Tensor:
    """One language-model training step on tokens ``x``: the whole step under ``clock("step")``, ``opt.step()``
    under ``clock("optimizer")`` with its host time appended to ``host_ms`` (how long the CPU is busy launching
    it). ``clock``: a callable returning a context manager per stage name; returns the loss."""
    with clock("step"):
        opt.zero_grad(set_to_none=set_to_none)
        with autocast:
            loss = model(x, labels=x).loss
        loss.backward()
        with clock("optimizer"):
            start = time.perf_counter()
            opt.step()
            host_ms.append((time.perf_counter() - start) * 1e3)
    return loss


def bench_one(
    name: str, args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor], q4_options: dict[str, Any]
) -> dict[str, Any]:
    factory, _ = OPTIMIZERS[name]
    model = _build_model(args, device)
    model.train()
    autocast = autocast_for(device)
    sync(device)
    before_opt = _allocated(device)
    opt = factory(_groups(model, args.weight_decay), args.lr, device, q4_options)

    stage_timer = _StageTimer(device) if args.phases and hasattr(opt, "stage_timer") else None
    if stage_timer is not None:
        opt.stage_timer = stage_timer
    clock = _StageTimer(device)
    losses: list[float] = []
    host_opt: list[float] = []  # host time of optimizer.step() (how long the CPU is busy launching it)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        x = batches[i % len(batches)]
        if i:
            clock.next_step()
            if stage_timer is not None:
                stage_timer.next_step()
        loss = timed_train_step(model, opt, x, clock, autocast, host_opt, set_to_none=not args.keep_grads)
        if i >= args.warmup and (i - args.warmup) % 20 == 0:
            losses.append(float(loss.detach()))
    sync(device)
    total_steps = args.warmup + args.steps
    timed, timed_opt = (
        clock.times("step", total_steps)[args.warmup :],
        clock.times("optimizer", total_steps)[args.warmup :],
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    # a captured step's private pool is reserved, not allocated, between steps: counted apart (step_graph.py)
    graph_pool = _graph_pool_bytes() if device.type == "cuda" else 0
    opt.zero_grad(set_to_none=True)
    sync(device)
    persistent = _allocated(device) - before_opt
    report = optimizer_state_bytes(opt)
    worst_at = max(range(len(timed)), key=timed.__getitem__)
    result = {
        "optimizer": name,
        "description": OPTIMIZERS[name][1],
        "state_bytes_per_param": report.bytes_per_param,
        "state_MiB": report.total / 2**20,
        "persistent_optimizer_MiB": persistent / 2**20 if device.type == "cuda" else None,
        "peak_MiB": peak / 2**20 if device.type == "cuda" else None,
        "graph_pool_MiB": graph_pool / 2**20 if device.type == "cuda" else None,
        "peak_with_graph_pool_MiB": (peak + graph_pool) / 2**20 if device.type == "cuda" else None,
        "step_graph": opt.graph_info() if hasattr(opt, "graph_info") else None,
        "median_step_ms": statistics.median(timed),
        "mean_step_ms": statistics.fmean(timed),
        "worst_step_ms": timed[worst_at],
        "worst_step_index": args.warmup + worst_at + 1,
        "median_optimizer_ms": statistics.median(timed_opt),
        "host_optimizer_median_ms": statistics.median(host_opt[args.warmup :]),
        "host_optimizer_mean_ms": statistics.fmean(host_opt[args.warmup :]),
        "warmup_step_ms": clock.times("step", total_steps)[: args.warmup],
        "mean_optimizer_ms": statistics.fmean(timed_opt),
        "losses_every_20": losses,
        "final_loss": float(loss.detach()),
        "step_ms": timed,
    }
    if stage_timer is not None:
        result.update(stage_timer.summary(skip=args.warmup, steps=args.warmup + args.steps))
    del opt, model, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile_steps(
    name: str, args: argparse.Namespace, device: torch.device, batches: list[torch.Tensor], q4_options: dict[str, Any]
) -> str:
    """Top ops (by self device time, then CPU time) of ``args.profile`` optimizer steps after a short warm-up."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    factory, _ = OPTIMIZERS[name]
    model = _build_model(args, device)
    opt = factory(_groups(model, args.weight_decay), args.lr, device, q4_options)

    def one(i):
        x = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with autocast_for(device):
            model(x, labels=x).loss.backward()

    for i in range(3):
        one(i)
        opt.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.profile):
            one(i)
            sync(device)
            with torch.profiler.record_function("optimizer.step"):
                opt.step()
            sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=sort, row_limit=25)
    text += "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)
    print(f"\n=== profile of {args.profile} steps, {name} ===\n{text}")
    return text


class _StageTimer:
    """Times named intervals: CUDA events on CUDA (read after the run), wall clock on CPU.

    Q4Shampoo calls it around each stage of its step (``stage_timer``), once per batch of same-shape
    parameters, so a stage can run several times in one step: :meth:`next_step` starts a new step and
    :meth:`times` sums each step's intervals. :func:`bench_one` times whole steps and optimizer steps with it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.records: dict[str, list] = {}
        self.step_index = 0

    def next_step(self) -> None:
        self.step_index += 1

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = self._mark()
        try:
            yield
        finally:
            self.records.setdefault(name, []).append((self.step_index, start, self._mark()))

    def times(self, name: str, steps: int | None = None) -> list[float]:
        """Milliseconds spent in ``name`` in each step (0 in steps without it; synchronize CUDA first)."""
        total = [0.0] * ((self.step_index + 1) if steps is None else steps)
        for index, a, b in self.records.get(name, []):
            ms = a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
            if index < len(total):
                total[index] += ms
        return total

    def summary(self, skip: int, steps: int) -> dict[str, Any]:
        out: dict[str, Any] = {"stage_ms": {}}
        for name in self.records:
            times = self.times(name, steps)[skip:]
            if times:
                out[f"stage_{name}_median_ms"] = statistics.median(times)
                out[f"stage_{name}_mean_ms"] = statistics.fmean(times)
                out["stage_ms"][name] = times
        return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args)
    q4_options = parse_optim_args(args.optim_args)
    batches = _batches(args, device, min(args.warmup + args.steps, 16))
    results, skipped = [], {}
    for name in args.optimizers.split(","):
        if name not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        try:
            results.append(bench_one(name, args, device, batches, q4_options))
            if args.profile and name.startswith(("q4shampoo", "shampoo")):
                results[-1]["profile"] = profile_steps(name, args, device, batches, q4_options)
        except ImportError as exc:
            skipped[name] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # noqa: BLE001 - a peer failing must not hide the others' numbers
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"
            if args.raise_errors:
                raise
    base = results[0] if results else None
    for r in results:
        for key in ("median_step_ms", "mean_step_ms", "worst_step_ms", "peak_MiB", "state_bytes_per_param"):
            if base and base.get(key) and r.get(key) is not None:
                r[f"{key}_ratio"] = r[key] / base[key]
        r["worst_over_median"] = r["worst_step_ms"] / r["median_step_ms"]
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        import transformers  # noqa: PLC0415

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return {"args": vars(args), "env": env, "results": results, "skipped": skipped}


def format_table(out: dict[str, Any]) -> str:
    head = (
        f"{'optimizer':<16}{'B/param':>8}{'state MiB':>10}{'persist MiB':>12}{'peak MiB':>10}"
        f"{'median ms':>10}{'mean ms':>9}{'worst ms':>9}{'opt ms':>8}{'x median':>9}{'x mean':>8}{'x peak':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in out["results"]:

        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"

        lines.append(
            f"{r['optimizer']:<16}{r['state_bytes_per_param']:>8.2f}{r['state_MiB']:>10.1f}"
            f"{fmt(r['persistent_optimizer_MiB'], '.1f'):>12}{fmt(r['peak_MiB'], '.0f'):>10}"
            f"{r['median_step_ms']:>10.1f}{r['mean_step_ms']:>9.1f}{r['worst_step_ms']:>9.1f}"
            f"{r['median_optimizer_ms']:>8.1f}{r.get('median_step_ms_ratio', 1):>9.2f}"
            f"{r.get('mean_step_ms_ratio', 1):>8.2f}{fmt(r.get('peak_MiB_ratio'), '.2f'):>8}"
        )
    for r in out["results"]:
        stages = [
            k[len("stage_") : -len("_median_ms")] for k in r if k.startswith("stage_") and k.endswith("_median_ms")
        ]
        if stages:
            parts = [f"{st} {r[f'stage_{st}_median_ms']:.2f}/{r[f'stage_{st}_mean_ms']:.2f}" for st in stages]
            lines.append(f"  {r['optimizer']} stages, median/mean ms per step: " + ", ".join(parts))
    for name, why in out["skipped"].items():
        lines.append(f"{name:<16}skipped: {why}")
    env = out["env"]
    lines.append(f"[{env['device']}, torch {env['torch']}, transformers {env.get('transformers', '?')}, {env['date']}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run_benchmark(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    print(format_table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
