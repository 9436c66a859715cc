"""Q4Shampoo on several GPUs: DDP with the preconditioner work split among ranks, and FSDP2 checkpoints.

    torchrun --standalone --nproc_per_node N benchmarks/multi_gpu_bench.py --out OUT_DIR
        [--modes ddp,fsdp2_ckpt] [--optimizers adamw,q4shampoo,q4shampoo_replicated]
        [--batch 8 --seq 1024 --steps 300 --warmup 20] [--optim_args update_freq=10,root_freq=100]
        [--data_world N] [--tiny]

``bash benchmarks/multi_gpu_bench.sh OUT_DIR [N]`` runs the whole comparison (N GPUs, 1 GPU at the same
per-rank batch, 1 GPU at the same global batch, the FSDP2 check) and prints the summary.

Mode ``ddp``: GPT-2 small from ``GPT2Config()`` (``--tiny``: a 2-layer, width-64 GPT-2 with short sequences,
for CPU runs with gloo) under DDP, bf16 autocast on CUDA, random tokens. Each optimizer in ``--optimizers``
gets a fresh model with the same initial weights and the same batches; ``adamw`` is torch's fused AdamW (the
reference of the ratios), ``q4shampoo`` splits the preconditioner work among the ranks
(``shard_preconditioners=true``, the default), ``q4shampoo_replicated`` is the same with the split off. Per
rank and optimizer it records: optimizer state bytes by kind (statistics and error feedback separately), step
time and optimizer time per step (CUDA events; median, mean over the timed window, worst), the time in
Q4Shampoo's root exchange (its communication, stage ``roots_exchange``), the bytes that exchange moved (per
timed step and per exchange), the losses, and a SHA-256 of the final parameters (replicas must agree bitwise).
The global batch of step t is ``data_world x batch`` sequences drawn from seed t; rank r of ``data_world``
ranks takes rows ``r*batch`` to ``(r+1)*batch``, a single process with ``--data_world N`` takes them all (the
same global batch as N ranks).

The other designs: ``q4shampoo_whole`` (``shard_parameters=true``: owners update whole parameters, which are
all-gathered), ``q4shampoo_zero`` / ``q4shampoo_zero_balanced`` (torch's ZeRO over Q4Shampoo,
``zero_design.py``); a ``_graph`` suffix sets ``cuda_graph=true`` and drops the stage timers, which would keep
the update eager (under the split the graph is refused, so ``q4shampoo_graph`` on several ranks is the split
without timers). Also recorded: the host time of ``step()`` and of each stage, the step of every worst time,
and ``host_events`` (Python garbage collections and Triton specializations by step, :class:`HostEvents`);
``--gc_freeze`` freezes the objects alive before the timed steps out of later collections.

Mode ``fsdp2_ckpt``: the same model under FSDP2 (``fully_shard`` per block and the root), Q4Shampoo for
``--ckpt_steps`` steps with a ``torch.distributed.checkpoint`` save of the model and
``get_optimizer_state_dict`` halfway; a fresh model and optimizer load it and run the second half. Records
whether the resumed parameters equal the uninterrupted ones bitwise.

Rank 0 writes ``OUT_DIR/multi_gpu_<mode>_ws<world size>[_data<data_world>].json`` (every rank's numbers).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_q4shampoo import Q4Shampoo  # noqa: E402
from hf_q4shampoo.bench import autocast_for, sync, timed_train_step  # noqa: E402
from hf_q4shampoo.config import parse_optim_args  # noqa: E402
from hf_q4shampoo.memory import optimizer_state_bytes  # noqa: E402

OPTIMIZERS = (
    "adamw",
    "q4shampoo",
    "q4shampoo_whole",
    "q4shampoo_whole_graph",
    "q4shampoo_graph",
    "q4shampoo_replicated",
    "q4shampoo_zero",
    "q4shampoo_zero_balanced",
)


class Timer:
    """Named intervals per step: CUDA events on CUDA (read once at the end), wall clock on CPU. Q4Shampoo calls
    it around the stages of its step (``stage_timer``); a stage may run several times in one step. The host's
    own time in each interval is kept too (``per_step(..., host=True)``): where it exceeds the device's, the host bounds
    the stage (a rank that launches slower reaches the next collective later)."""

    def __init__(self, device: torch.device):
        self.device, self.step, self.records = device, 0, defaultdict(list)

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def __call__(self, name: str):
        start, host = self._mark(), time.perf_counter()
        try:
            yield
        finally:
            self.records[name].append((self.step, start, self._mark(), (time.perf_counter() - host) * 1e3))

    def per_step(self, name: str, steps: int, host: bool = False) -> list[float]:
        """Milliseconds of ``name`` per step: the device's (events; wall clock on CPU), or with ``host`` the
        host's own time inside the intervals."""
        out = [0.0] * steps
        for step, a, b, host_ms in self.records.get(name, []):
            if step < steps:
                if host:
                    out[step] += host_ms
                else:
                    out[step] += a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
        return out


class HostEvents:
    """One-off host events by step, to explain a step far slower than the others: Python garbage collections
    (``gc.callbacks``: every generation-2 collection, and any other of 1 ms or more) and Triton kernel
    specializations that were not in memory yet (``triton.knobs.runtime.jit_cache_hook``: a compilation or a
    load from the disk cache). Installed around one optimizer's run."""

    def __init__(self) -> None:
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self._gc_start: float | None = None
        self._knobs: Any = None
        self._previous_hook: Any = None

    def __enter__(self) -> HostEvents:
        gc.callbacks.append(self._on_gc)
        try:
            import triton.knobs as knobs

            self._knobs, self._previous_hook = knobs, knobs.runtime.jit_cache_hook
            knobs.runtime.jit_cache_hook = self._on_triton
        except (ImportError, AttributeError):  # no Triton, or one without the hook: collections only
            self._knobs = None
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._on_gc)
        if self._knobs is not None:
            self._knobs.runtime.jit_cache_hook = self._previous_hook

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            ms = (time.perf_counter() - self._gc_start) * 1e3
            if info["generation"] == 2 or ms >= 1.0:
                self.events.append(
                    {"step": self.step, "kind": f"gc{info['generation']}", "ms": ms, "collected": info["collected"]}
                )

    def _on_triton(self, *args: Any, **kwargs: Any) -> bool:
        kernel = str(kwargs.get("repr"))[:160]
        self.events.append({"step": self.step, "kind": "triton_specialization", "kernel": kernel})
        return False  # False: go on compiling (True would skip the kernel)


def _summary(times: list[float], first: int = 0) -> dict[str, float]:
    """Median, mean and worst of per-step times; ``worst_step``: the step index of the worst (``first`` is the
    index of ``times[0]``), to find one-off events (a compilation, an allocation) in the logs."""
    worst = max(range(len(times)), key=times.__getitem__)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "worst_ms": times[worst],
        "worst_step": first + worst,
    }


def _model_config(args: argparse.Namespace):
    from transformers import GPT2Config

    # --deterministic: the eager attention, since cuDNN's attention backward has no deterministic algorithm
    attention = {"attn_implementation": "eager"} if args.deterministic else {}
    if args.tiny:
        return GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=args.seq, **attention)
    return GPT2Config(**attention)  # GPT-2 small: 12 layers, width 768, vocabulary 50257, 1024 positions


def _build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(_model_config(args)).to(device)


def _batch(args: argparse.Namespace, step: int, rank: int, world: int, vocab: int, device: torch.device):
    rows = torch.randint(
        0,
        vocab,
        (args.data_world * args.batch, args.seq),
        generator=torch.Generator().manual_seed(args.seed * 100003 + step),
    )
    if world > 1:
        rows = rows[rank * args.batch : (rank + 1) * args.batch]
    return rows.to(device)


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    groups = _groups(model, args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda")
    options = parse_optim_args(args.optim_args)
    if name.startswith("q4shampoo_zero"):
        # the other design (Distributed Shampoo's, ZeRO-1's): each rank steps whole parameters of its own and the
        # updated parameters are broadcast (benchmarks/zero_design.py); "_balanced": partition by modelled cost
        # and one bucketed broadcast per rank instead of ZeRO's count partition and per-parameter broadcasts
        from zero_design import make_zero

        balanced = name == "q4shampoo_zero_balanced"
        return make_zero(groups, args.lr, options, balanced=balanced, bucket_view=balanced)
    if name.endswith("_graph"):  # the update captured as a CUDA graph (no stage timer: it would keep it eager)
        options["cuda_graph"] = True
    options["shard_preconditioners"] = name != "q4shampoo_replicated"
    # owners update whole parameters, which are all-gathered after the step
    options["shard_parameters"] = name.startswith("q4shampoo_whole")
    return Q4Shampoo(groups, lr=args.lr, **options)


def _local(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (ZeroRedundancyOptimizer wraps one)."""
    return getattr(opt, "optim", opt)


def _params_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        digest.update(full.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    opt = _local(opt)
    if isinstance(opt, Q4Shampoo):
        out: dict[str, int] = defaultdict(int)
        for group in opt.param_groups:
            for p in group["params"]:
                for kind, nbytes in opt.state_bytes(p).items():
                    out[kind] += nbytes
        out["total"] = sum(v for k, v in out.items() if k != "total")
        return dict(out)
    return {"total": optimizer_state_bytes(opt).total}


def run_ddp(name: str, args: argparse.Namespace, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """One optimizer under DDP (a plain model in a single process): timings, bytes, losses, final hash."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = _build_model(args, device)
    vocab = model.config.vocab_size
    wrapped = model
    if world > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = _make_optimizer(name, model, args, device)
    timer = Timer(device)
    if isinstance(_local(opt), Q4Shampoo) and not name.endswith("_graph"):
        _local(opt).stage_timer = timer
    total = args.warmup + args.steps
    losses, before, host_ms = [], None, []
    profiler = None
    with HostEvents() as events:
        for step in range(total):
            timer.step = events.step = step
            if args.profile_steps and step == args.warmup:  # the first timed steps, as a trace per rank
                profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
                )
                profiler.start()
            if profiler is not None and step == args.warmup + args.profile_steps:
                profiler.stop()
                path = os.path.join(args.out, f"trace_{name}_rank{rank}.json")
                profiler.export_chrome_trace(path)
                profiler = None
            if step == args.warmup:
                if args.gc_freeze:  # everything alive now is left out of later collections (gc.freeze)
                    gc.collect()
                    gc.freeze()
                sync(device)
                info = opt.distributed_info() if isinstance(opt, Q4Shampoo) else None
                before = dict(info) if info else None
            x = _batch(args, step, rank, world, vocab, device)
            loss = timed_train_step(wrapped, opt, x, timer, autocast_for(device), host_ms)
            if step >= args.warmup and (step - args.warmup) % args.log_every == 0:
                losses.append(float(loss.detach()))
        sync(device)
    if args.gc_freeze:
        gc.unfreeze()  # the next optimizer's run freezes its own objects
    result: dict[str, Any] = {
        "optimizer": name,
        "state_bytes": _state_bytes(opt),
        "step": _summary(timer.per_step("step", total)[args.warmup :], args.warmup),
        "optimizer_step": _summary(timer.per_step("optimizer", total)[args.warmup :], args.warmup),
        # host time of the step() call (launches, Python; no device sync): above the device time, the host bounds it
        "optimizer_step_host_ms_median": statistics.median(host_ms[args.warmup :]),
        "optimizer_step_host_ms_mean": statistics.fmean(host_ms[args.warmup :]),
        # garbage collections and Triton specializations in the timed steps (to explain one-off slow steps)
        "host_events": [e for e in events.events if e["step"] >= args.warmup],
        "losses": losses,
        "final_loss": float(loss.detach()),
        "params_sha256": _params_sha256(model),
        # model, gradients, optimizer state and activations of this optimizer's run, allocated by torch
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    stages, stages_host = {}, {}
    for stage in ("statistics", "roots", "roots_exchange", "apply", "grafting", "first_order", "parameters_exchange"):
        if stage in timer.records:
            stages[stage] = _summary(timer.per_step(stage, total)[args.warmup :], args.warmup)
            stages_host[stage] = _summary(timer.per_step(stage, total, host=True)[args.warmup :], args.warmup)
    result["stages"] = stages
    if isinstance(_local(opt), Q4Shampoo):
        result["graph"] = _local(opt).graph_info()  # captures and replays of the graphed update (None: eager only)
    result["stages_host"] = stages_host
    info = opt.distributed_info() if isinstance(opt, Q4Shampoo) else None
    if info is not None and before is not None:
        counted = ("exchanges", "payload_bytes", "received_bytes", "parameter_exchanges", "parameter_bytes_received")
        moved = {k: info[k] - before.get(k, 0) for k in counted}
        result["communication"] = {
            "owned_per_rank": info["owned_per_rank"],
            "timed_steps": args.steps,
            **moved,
            "received_bytes_per_step": moved["received_bytes"] / args.steps,
            "received_bytes_per_exchange": moved["received_bytes"] / max(1, moved["exchanges"]),
            "payload_bytes_per_exchange": moved["payload_bytes"] / max(1, moved["exchanges"]),
            "exchange_ms_per_step_mean": stages.get("roots_exchange", {}).get("mean_ms", 0.0),
            "parameter_bytes_received_per_step": moved["parameter_bytes_received"] / args.steps,
            "parameter_exchange_ms_per_step_mean": stages.get("parameters_exchange", {}).get("mean_ms", 0.0),
        }
    del opt, wrapped, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_fsdp2_ckpt(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """FSDP2 + Q4Shampoo: DCP save at half of ``--ckpt_steps``, resume in a fresh model, compare bitwise."""
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def build():
        model = _build_model(args, device)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        options = parse_optim_args(args.optim_args)
        return model, Q4Shampoo(_groups(model, args.weight_decay), lr=args.lr, **options)

    def train(model, opt, steps):
        for step in steps:
            torch.manual_seed(args.seed + 7919 * step + rank)  # dropout masks depend on the step, not the history
            x = _batch(args, step, rank, world, model.config.vocab_size, device)
            opt.zero_grad(set_to_none=True)
            with autocast_for(device):
                model(x, labels=x).loss.backward()
            opt.step()

    half = args.ckpt_steps // 2
    folder = [tempfile.mkdtemp(prefix="q4_fsdp2_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    path = os.path.join(args.out, "fsdp2_dcp") if args.keep_checkpoint else folder[0]
    model, opt = build()
    train(model, opt, range(half))
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    train(model, opt, range(half, args.ckpt_steps))
    uninterrupted = _params_sha256(model)
    del model, opt
    model, opt = build()
    template = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(template, checkpoint_id=path)
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, opt, template["optim"])
    train(model, opt, range(half, args.ckpt_steps))
    resumed = _params_sha256(model)
    del model, opt
    # the control: a second uninterrupted run; if it differs from the first, the GPU's own run-to-run
    # non-determinism (atomics in backward kernels) and not the checkpoint explains a resumed run that differs
    model, opt = build()
    train(model, opt, range(args.ckpt_steps))
    control = _params_sha256(model)
    return {
        "steps": args.ckpt_steps,
        "checkpoint_step": half,
        "uninterrupted_sha256": uninterrupted,
        "resumed_sha256": resumed,
        "resumed_bitwise_equal": uninterrupted == resumed,
        "control_sha256": control,
        "uninterrupted_runs_bitwise_equal": uninterrupted == control,
        "checkpoint": path,
    }


def _environment(device: torch.device, world: int) -> dict[str, Any]:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def summarize(folder: str, world: int) -> dict[str, Any]:
    """The issue's comparisons from the JSON files of ``multi_gpu_bench.sh`` (no GPU needed): N ranks against one
    GPU at the same per-rank batch (memory, optimizer time) and at the same global batch (loss)."""

    def load(name: str) -> dict[str, Any] | None:
        path = os.path.join(folder, name)
        return json.load(open(path)) if os.path.exists(path) else None

    multi, single = load(f"multi_gpu_ddp_ws{world}.json"), load("multi_gpu_ddp_ws1.json")
    same_global, fsdp = load(f"multi_gpu_ddp_ws1_data{world}.json"), load(f"multi_gpu_fsdp2_ckpt_ws{world}.json")
    out: dict[str, Any] = {"world_size": world, "env": (multi or {}).get("env")}

    def by_name(run, rank=0):
        return {r["optimizer"]: r for r in run["ranks"][rank]} if run else {}

    def split(r):
        return r["state_bytes"].get("statistics", 0) + r["state_bytes"].get("error_feedback", 0)

    if multi and single:
        one = by_name(single)
        designs = [name for name in OPTIMIZERS if name.startswith("q4shampoo")]
        for name in designs:
            if name not in one and "q4shampoo" in one:
                one[name] = one["q4shampoo"]  # one GPU: the split never applies
        for name in designs:
            ranks = [by_name(multi, k).get(name) for k in range(world)]
            if None in ranks or name not in one:
                continue
            out[name] = {
                "stats_ef_bytes_per_rank": [split(r) for r in ranks],
                "stats_ef_bytes_one_gpu": split(one[name]),
                "stats_ef_ratio_max_rank": max(split(r) for r in ranks) / max(1, split(one[name])),
                "state_bytes_per_rank": [r["state_bytes"]["total"] for r in ranks],
                "state_bytes_one_gpu": one[name]["state_bytes"]["total"],
                "optimizer_ms_per_rank": [r["optimizer_step"]["mean_ms"] for r in ranks],
                "optimizer_ms_one_gpu": one[name]["optimizer_step"]["mean_ms"],
                "optimizer_median_ms_per_rank": [r["optimizer_step"]["median_ms"] for r in ranks],
                "optimizer_median_ms_one_gpu": one[name]["optimizer_step"]["median_ms"],
                # host time of step() (no device sync): where it exceeds the device time, the host bounds the rank
                "optimizer_host_ms_median_per_rank": [r.get("optimizer_step_host_ms_median") for r in ranks],
                "optimizer_host_ms_median_one_gpu": one[name].get("optimizer_step_host_ms_median"),
                "optimizer_time_ratio_max_rank": max(r["optimizer_step"]["mean_ms"] for r in ranks)
                / one[name]["optimizer_step"]["mean_ms"],
                "step_ms_rank0": ranks[0]["step"]["mean_ms"],
                "peak_allocated_bytes_per_rank": [r.get("peak_allocated_bytes") for r in ranks],
                "peak_allocated_bytes_one_gpu": one[name].get("peak_allocated_bytes"),
                "communication_rank0": ranks[0].get("communication"),
                "replicas_bitwise_equal": multi["replicas_bitwise_equal"].get(name),
            }
            adamw = by_name(multi).get("adamw")
            if adamw:
                out[name]["step_ratio_to_fused_adamw"] = ranks[0]["step"]["mean_ms"] / adamw["step"]["mean_ms"]
    if multi and same_global:
        ranks0 = by_name(multi)
        one_process = by_name(same_global)
        # every Q4Shampoo design is the single-process optimizer at the same global batch: one reference for all
        out["final_loss"] = {
            name: {
                "ranks": ranks0[name]["final_loss"],
                "one_gpu_same_global_batch": one_process.get(name, one_process.get("q4shampoo", {})).get("final_loss"),
            }
            for name in ranks0
            if name in one_process or name.startswith("q4shampoo")
        }
    if fsdp:
        out["fsdp2_dcp_resume_bitwise_equal"] = all(r[0]["resumed_bitwise_equal"] for r in fsdp["ranks"])
        out["fsdp2_uninterrupted_runs_bitwise_equal"] = all(
            r[0].get("uninterrupted_runs_bitwise_equal") for r in fsdp["ranks"]
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON results (rank 0 writes them)")
    p.add_argument(
        "--summarize",
        type=int,
        default=0,
        metavar="N",
        help="no run: print the comparison of N ranks with one GPU from the JSON files in --out",
    )
    p.add_argument("--modes", default="ddp,fsdp2_ckpt", help="comma-separated: ddp, fsdp2_ckpt")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"for mode ddp, from {', '.join(OPTIMIZERS)}")
    p.add_argument("--optim_args", default="update_freq=10,root_freq=100", help="Q4Shampoo options (--optim_args)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300, help="timed steps")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--log_every", type=int, default=10, help="record the loss every this many timed steps")
    p.add_argument(
        "--data_world",
        type=int,
        default=None,
        help="ranks whose batches form the global batch (default: the world size); a single process "
        "with N takes the global batch of N ranks",
    )
    p.add_argument("--ckpt_steps", type=int, default=40, help="fsdp2_ckpt: steps, with the checkpoint at half")
    p.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        help="mode ddp: a torch.profiler chrome trace of this many steps after the warm-up, per optimizer and rank",
    )
    p.add_argument("--keep_checkpoint", action="store_true", help="fsdp2_ckpt: write the checkpoint under --out")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms (warn only) and a fixed cuBLAS workspace: GPU runs repeat bitwise",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gc_freeze",
        action="store_true",
        help="gc.collect() then gc.freeze() before the timed steps: long-lived objects leave Python's collections",
    )
    p.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 GPT-2 and short steps (CPU, gloo)")
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in dict(
            seq=32,
            batch=2,
            steps=12,
            warmup=2,
            log_every=2,
            ckpt_steps=8,
            optim_args="update_freq=2,root_freq=4,min_quant_numel=256",
        ).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        summary = summarize(args.out, args.summarize)
        with open(os.path.join(args.out, f"summary_ws{args.summarize}.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(json.dumps(summary, indent=1))
        return 0
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True, warn_only=True)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    args.data_world = args.data_world or world
    if world > 1 and args.data_world != world:
        raise SystemExit(f"--data_world {args.data_world} must equal the world size {world} (or run one process)")
    os.makedirs(args.out, exist_ok=True)
    for mode in args.modes.split(","):
        if mode == "ddp":
            mine = [run_ddp(name, args, device, rank, world) for name in args.optimizers.split(",")]
        elif mode == "fsdp2_ckpt":
            mine = [run_fsdp2_ckpt(args, device, rank, world)]
        else:
            raise SystemExit(f"unknown mode {mode!r}; choose from ddp, fsdp2_ckpt")
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, mine)
        if rank != 0:
            continue
        out = {"mode": mode, "args": vars(args), "env": _environment(device, world), "ranks": ranks}
        if mode == "ddp":
            out["replicas_bitwise_equal"] = {
                r["optimizer"]: len({ranks[k][i]["params_sha256"] for k in range(world)}) == 1
                for i, r in enumerate(ranks[0])
            }
        suffix = f"_data{args.data_world}" if args.data_world != world else ""
        path = os.path.join(args.out, f"multi_gpu_{mode}_ws{world}{suffix}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {path}")
        for r in ranks[0]:
            if mode == "ddp":
                comm = r.get("communication", {})
                print(
                    f"rank0 {r['optimizer']:<22} step {r['step']['mean_ms']:.1f} ms  optimizer "
                    f"{r['optimizer_step']['mean_ms']:.2f} ms  state {r['state_bytes']['total'] / 2**20:.1f} MiB  "
                    f"exchange {comm.get('exchange_ms_per_step_mean', 0):.2f} ms/step, "
                    f"{comm.get('received_bytes_per_step', 0) / 2**10:.1f} KiB/step  "
                    f"replicas equal {out['replicas_bitwise_equal'][r['optimizer']]}"
                )
            else:
                print(f"fsdp2 DCP resume bitwise equal: {r['resumed_bitwise_equal']}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without the interpreter's teardown: with gloo on CPU it occasionally aborts there ("terminate called
    # without an active exception") after everything is written and the process group destroyed
    os._exit(code)
