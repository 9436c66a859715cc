"""Where 4-bit AdamW loses on the ill-conditioned teacher task, and whether storing the normalised momentum helps.

A probe for issues 14 and 15 (the 4-bit first moment m is the costly part: docs/results.md §4.3), not a package
feature. AdamW written out in torch, with each moment either kept in fp32 or passed through its 4-bit code after
every update (a round trip, the same values a stored code would give back):

* ``m4``: m in blocks of 128 with the signed code (``--code``), as Q4AdamW stores it;
* ``w4``: the normalised momentum ``w = m / (sqrt(v) + eps)`` in blocks of 128 instead, m rebuilt as
  ``w * (sqrt(v_prev) + eps)`` at the next step. Why: the step is ``m / (sqrt(v) + eps)``, so an error in m is
  divided by ``sqrt(v)``; a block's absmax scale is set by its large-m entries, and the coordinates with small v
  (rarely excited directions of an ill-conditioned problem) get the largest step errors. In w every coordinate's
  error is relative to the largest step in its block, which is what the update sees;
* ``v4``: v rank-1 normalised with the zero-free linear code (Q4AdamW's); ``v4sqrt``: sqrt(v) through the same
  code (half the dynamic range); else fp32.

    python benchmarks/normalized_momentum_probe.py [--seeds 0,1,2] [--lrs 0.01,0.03] [--code dynamic]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_cpu import teacher  # noqa: E402

from hf_q4shampoo.quant import dequantize_rank1, quantize_rank1, roundtrip_blockwise  # noqa: E402

BLOCK = 128
MIN_NUMEL = 4096  # Q4AdamW's threshold: smaller tensors keep fp32 moments


class ProbeAdamW(torch.optim.Optimizer):
    """AdamW (weight decay 0) with the moments' storage chosen by ``m`` ("fp32", "m4", "w4") and ``v`` ("fp32",
    "v4"); tensors of at most 4,096 entries keep fp32 moments."""

    def __init__(self, params, lr: float, m: str, v: str, code: str, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.m_mode, self.v_mode, self.code = m, v, code

    def _v_store(self, v: torch.Tensor) -> torch.Tensor:
        if v.numel() <= MIN_NUMEL or v.dim() != 2:
            return v
        if self.v_mode == "v4":
            return dequantize_rank1(quantize_rank1(v), v.shape)
        if self.v_mode == "v4sqrt":  # sqrt(v) through the same code: half the dynamic range to cover
            return dequantize_rank1(quantize_rank1(v.sqrt()), v.shape).square()
        return v

    def _m_store(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= MIN_NUMEL:
            return x
        return roundtrip_blockwise(x.reshape(-1), self.code, BLOCK).reshape(x.shape)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                t, g, eps = st["t"], p.grad, group["eps"]
                quantized = p.numel() > MIN_NUMEL
                if self.m_mode == "w4" and quantized:
                    m = st["m"] * (st["v"].sqrt() + eps)  # st["m"] holds w; st["v"] is the v it was made with
                else:
                    m = st["m"]
                m = b1 * m + (1 - b1) * g
                v = self._v_store(b2 * st["v"] + (1 - b2) * g * g)
                if self.m_mode == "w4" and quantized:
                    w = self._m_store(m / (v.sqrt() + eps))
                    m = w * (v.sqrt() + eps)
                    st["m"] = w
                elif self.m_mode == "m4":
                    m = st["m"] = self._m_store(m)
                else:
                    st["m"] = m
                st["v"] = v
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                p.add_(m_hat / (v_hat.sqrt() + eps), alpha=-group["lr"])


CONFIGS = {
    "adamw_fp32": dict(m="fp32", v="fp32"),
    "m4_vfp32": dict(m="m4", v="fp32"),
    "w4_vfp32": dict(m="w4", v="fp32"),
    "mfp32_v4": dict(m="fp32", v="v4"),
    "m4_v4": dict(m="m4", v="v4"),
    "mfp32_v4sqrt": dict(m="fp32", v="v4sqrt"),
    "m4_v4sqrt": dict(m="m4", v="v4sqrt"),
    "w4_v4": dict(m="w4", v="v4"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="0.01,0.03")
    ap.add_argument("--code", default="dynamic", help="signed 4-bit code of m / w: dynamic or linear2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    for lr in (float(x) for x in args.lrs.split(",")):
        rows = results[f"{lr:g}"] = {}
        for name, cfg in CONFIGS.items():

            def make(ps, steps, cfg=cfg, lr=lr):
                return ProbeAdamW(ps, lr, code=args.code, **cfg)

            runs = [teacher(make, s) for s in seeds]
            rows[name] = {"runs": runs, "mean": sum(runs) / len(runs)}
        base = rows["adamw_fp32"]["mean"]
        for name, row in rows.items():
            row["vs_fp32"] = row["mean"] / base - 1.0
            print(f"lr {lr:<5g} {name:11s} {row['mean']:.4f} {100 * row['vs_fp32']:+6.2f}%  {row['runs']}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": "python " + " ".join(sys.argv),
                    "machine": f"CPU, 1 torch thread, torch {torch.__version__}",
                    "date": time.strftime("%Y-%m-%d"),
                    "results": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
