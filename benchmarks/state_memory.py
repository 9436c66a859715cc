"""Optimizer-state bytes per parameter of GPT-2 small for Q4Shampoo settings, from real state tensors (CPU).

Builds ``GPT2LMHeadModel(GPT2Config())`` (124M parameters, fp32, random init), creates the optimizer state of
every parameter with ``Q4Shampoo.build_state()`` (the tensors the first step would create, on the CPU) and
counts them with ``hf_q4shampoo.memory.optimizer_state_bytes`` (bytes of every state tensor, split by kind).
No training step is needed: the state's size does not change during training.

    python benchmarks/state_memory.py                                   # default vs first_order_v=factored
    python benchmarks/state_memory.py --variant "refine:factor_upper=refine" --json out.json
    python benchmarks/state_memory.py --by_name      # also every state tensor's MiB by name, per setting
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_result  # noqa: E402

from hf_q4shampoo import Q4Shampoo  # noqa: E402
from hf_q4shampoo.config import parse_optim_args  # noqa: E402
from hf_q4shampoo.memory import KINDS, optimizer_state_bytes, tensor_bytes  # noqa: E402

MIB = 2**20


def mib_by_name(opt: Q4Shampoo) -> dict[str, float]:
    """MiB of every state key summed over the parameters, largest first; a preconditioner region's tensors as
    ``SIDE.key`` (``L.factor_codes``, ``R.root_scales``, ...): which tensors a memory lever would shrink."""
    out: dict[str, int] = {}
    for state in opt.state.values():
        named = [(key, value) for key, value in state.items() if key != "regions"]
        for sides in state.get("regions") or ():
            named += [(f"{side}.{key}", t) for side, tensors in sides.items() for key, t in tensors.items()]
        for name, t in named:
            if isinstance(t, torch.Tensor):
                out[name] = out.get(name, 0) + tensor_bytes(t)
    return {name: b / MIB for name, b in sorted(out.items(), key=lambda kv: -kv[1])}


def measure(model: torch.nn.Module, options: dict) -> dict:
    opt = Q4Shampoo(model.parameters(), **options)
    opt.build_state()
    report = optimizer_state_bytes(opt)
    out = {
        "bytes_per_param": report.bytes_per_param,
        "total_mib": report.total / MIB,
        "mib_by_kind": {k: report.by_kind[k] / MIB for k in KINDS if report.by_kind[k]},
        "mib_by_name": mib_by_name(opt),
    }
    del opt
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value;key=value (Q4Shampoo options)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--by_name", action="store_true", help="print each setting's MiB per state key too")
    args = ap.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    variants = {"default": {}, "first_order_v=factored": {"first_order_v": "factored"}}
    for text in args.variant:
        name, _, opts = text.partition(":")
        variants[name] = parse_optim_args(opts.replace(";", ","))
    results = {}
    params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 small: {params / 1e6:.1f}M parameters")
    print("| setting | bytes/param | total MiB | " + " | ".join(k for k in KINDS) + " |")
    print("|---|---|---|" + "---|" * len(KINDS))
    for name, options in variants.items():
        r = results[name] = measure(model, options)
        kinds = " | ".join(f"{r['mib_by_kind'].get(k, 0.0):.1f}" for k in KINDS)
        print(f"| {name} | {r['bytes_per_param']:.3f} | {r['total_mib']:.1f} | {kinds} |")
    if args.by_name:
        for name, r in results.items():
            print(f"\n{name}: " + ", ".join(f"{key} {mib:.2f}" for key, mib in r["mib_by_name"].items()))
    if args.json:
        write_result(args.json, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
