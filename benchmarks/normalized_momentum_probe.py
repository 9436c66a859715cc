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
* ``m4sr``: m as ``m4`` but rounded stochastically (unbiased): a small EMA increment that round-to-nearest would
  drop every step (an entry stuck at a level) moves the stored m on average;
* ``v4``: v rank-1 normalised with the zero-free linear code (Q4AdamW's); ``v4sqrt``: sqrt(v) through the same
  code (half the dynamic range); ``v4b128`` / ``v4b32``: v normalised by block-wise absmax (blocks of 128 / 32)
  with the same code; ``bf16``: m and v rounded to bfloat16 after every update (a control: how much any
  rounding moves this task); else fp32.

    python benchmarks/normalized_momentum_probe.py [--seeds 0,1,2] [--lrs 0.01,0.03] [--code dynamic]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_result  # noqa: E402
from quality_cpu import teacher  # noqa: E402

from hf_q4shampoo.quant import _blocked, dequantize_rank1, get_code, quantize_rank1, roundtrip_blockwise  # noqa: E402

BLOCK = 128
MIN_NUMEL = 4096  # Q4AdamW's threshold: smaller tensors keep fp32 moments


def roundtrip_stochastic(x: torch.Tensor, code: str, block: int, gen: torch.Generator) -> torch.Tensor:
    """Block-wise absmax and ``code`` as :func:`roundtrip_blockwise`, but each entry rounded to one of its two
    neighbouring levels at random, with the probability that makes the rounding unbiased (E[D(Q(x))] = x)."""
    n = x.numel()
    table, _ = get_code(code, x.device)
    blocks = _blocked(x.reshape(-1).float(), block)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    upper = torch.bucketize(normed, table).clamp(1, table.numel() - 1)  # first level >= the value
    lo, hi = table[upper - 1], table[upper]
    up = torch.rand(normed.shape, generator=gen) < (normed - lo) / (hi - lo)
    return (torch.where(up, hi, lo).clamp(table[0], table[-1]) * absmax).reshape(-1)[:n].reshape(x.shape)


class ProbeAdamW(torch.optim.Optimizer):
    """AdamW (weight decay 0) with the moments' storage chosen by ``m`` ("fp32", "m4", "w4") and ``v`` ("fp32",
    "v4"); tensors of at most 4,096 entries keep fp32 moments."""

    def __init__(
        self,
        params,
        lr: float,
        m: str,
        v: str,
        code: str,
        m_block: int = BLOCK,
        decay_steps: int = 0,
        betas=(0.9, 0.999),
        eps=1e-8,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.m_mode, self.v_mode, self.code, self.m_block = m, v, code, m_block
        self.gen = torch.Generator().manual_seed(1234)
        self.decay_steps = decay_steps  # > 0: lr falls linearly to 0 over this many steps (the Trainer's default)

    def _v_store(self, v: torch.Tensor) -> torch.Tensor:
        if v.numel() <= MIN_NUMEL or v.dim() != 2:
            return v
        if self.v_mode == "v4":
            return dequantize_rank1(quantize_rank1(v), v.shape)
        if self.v_mode == "v4sqrt":  # sqrt(v) through the same code: half the dynamic range to cover
            return dequantize_rank1(quantize_rank1(v.sqrt()), v.shape).square()
        if self.v_mode == "bf16":  # a control: 8 bits of mantissa, far finer than any 4-bit code
            return v.bfloat16().float()
        if self.v_mode.startswith("v4b"):  # block-wise absmax (paper 3's B128 normalisation), zero-free linear code
            block = int(self.v_mode[3:])
            return roundtrip_blockwise(v.reshape(-1), "zero_free_linear", block).reshape(v.shape)
        return v

    def _m_store(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= MIN_NUMEL:
            return x
        return roundtrip_blockwise(x.reshape(-1), self.code, self.m_block).reshape(x.shape)

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
                elif self.m_mode == "m4sr" and quantized:
                    m = st["m"] = roundtrip_stochastic(m, self.code, self.m_block, self.gen)
                elif self.m_mode == "bf16" and quantized:
                    m = st["m"] = m.bfloat16().float()
                else:
                    st["m"] = m
                st["v"] = v
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                lr = group["lr"] * (1.0 - (t - 1) / self.decay_steps if self.decay_steps else 1.0)
                p.add_(m_hat / (v_hat.sqrt() + eps), alpha=-lr)


CONFIGS = {
    "adamw_fp32": dict(m="fp32", v="fp32"),
    "m4_vfp32": dict(m="m4", v="fp32"),
    "w4_vfp32": dict(m="w4", v="fp32"),
    "mfp32_v4": dict(m="fp32", v="v4"),
    "m4_v4": dict(m="m4", v="v4"),
    "mfp32_v4sqrt": dict(m="fp32", v="v4sqrt"),
    "m4_v4sqrt": dict(m="m4", v="v4sqrt"),
    "w4_v4": dict(m="w4", v="v4"),
    "mbf16_vbf16": dict(m="bf16", v="bf16"),
    "m4sr_vfp32": dict(m="m4sr", v="fp32"),
    "m4sr_v4": dict(m="m4sr", v="v4"),
    "mfp32_v4b128": dict(m="fp32", v="v4b128"),
    "mfp32_v4b32": dict(m="fp32", v="v4b32"),
    "m4_v4b128": dict(m="m4", v="v4b128"),
    "m4_v4b32": dict(m="m4", v="v4b32"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lrs", default="0.01,0.03")
    ap.add_argument("--code", default="dynamic", help="signed 4-bit code of m / w: dynamic or linear2")
    ap.add_argument("--m_block", type=int, default=BLOCK, help="block size of the 4-bit m / w (Q4AdamW: 128)")
    ap.add_argument("--decay", action="store_true", help="linear lr decay to 0 over the run (else constant lr)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    for lr in (float(x) for x in args.lrs.split(",")):
        rows = results[f"{lr:g}"] = {}
        names = args.configs.split(",") if args.configs else list(CONFIGS)
        for name in names:
            cfg = CONFIGS[name]

            def make(ps, steps, cfg=cfg, lr=lr):
                decay = steps if args.decay else 0
                return ProbeAdamW(ps, lr, code=args.code, m_block=args.m_block, decay_steps=decay, **cfg)

            runs = [teacher(make, s) for s in seeds]
            rows[name] = {"runs": runs, "mean": sum(runs) / len(runs)}
        base = rows["adamw_fp32"]["mean"]
        for name, row in rows.items():
            row["vs_fp32"] = row["mean"] / base - 1.0
            print(f"lr {lr:<5g} {name:11s} {row['mean']:.4f} {100 * row['vs_fp32']:+6.2f}%  {row['runs']}", flush=True)
    if args.json:
        write_result(args.json, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
