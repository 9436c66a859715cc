"""Issue 14 follow-up: does Distributed Shampoo's grafting order survive a 4-bit momentum if the momentum is stored
*after* preconditioning?

docs/results.md §4.3b: the filtered order (``grafting="adam_filtered"``: Shampoo of the momentum M of the raw
gradient, each block at the norm of the AdamW step) closes the gap to Distributed Shampoo on the LM task, but with
4-bit moments it loses 20-50x on the hard-conditioning family: the 4-bit error of M is preconditioned afterwards,
so it is amplified along the small-eigenvalue directions. This probe runs ``lm_gap.Mini`` (the reference Shampoo
with fp32 factors and roots, so only the momentum's storage differs) on the family's problems with:

    graft=ds      M stored; step P(M) at ||M / (sqrt(V) + eps)|| per tensor (the filtered order)
    graft=dspre   U = P(M) stored instead (U <- b1 U + (1 - b1) P(G); at each root refresh U <- P_new P_old^-1 U,
                  so in exact arithmetic U is P(M) and the step is the same as ds); the graft norm takes
                  M = P^-1(U) by two solves: an idealisation (a real optimizer would need the positive roots)
    graft=norm    our default order (Shampoo of G at ||G||, then AdamW on it), for reference
    exactnorm=1   (dspre) the graft norm from an fp32 M of the raw gradient kept beside U: which of U's two uses, the
                  direction or the norm, the 4-bit error spoils
    mq=1          the stored momentum (M, U, or norm's m) keeps the 4-bit signed code of the default (Linear-2,
                  blocks of 256, one-byte scales); as in the optimizer, a step uses the new value; v stays fp32;
                  ``code`` and ``block`` change the code (``dynamic``) and the block size; ``ef=1`` (dspre) adds an fp32
                  error-feedback buffer to U's rounding (a diagnosis: is the loss the rounding's bias?); ``sr=1``
                  (dspre) rounds U stochastically instead (unbiased, no extra state; fp32 block scales)

    python benchmarks/filtered_momentum_probe.py --problems ls_k1e4_256x128,ls_k1e6_256x128 \
        --variants "ds/32:graft=ds" "ds/4:graft=ds;mq=1" "pre/4:graft=dspre;mq=1"
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hard_conditioning as hc  # noqa: E402
from lm_gap import Mini  # noqa: E402

from hf_q4shampoo.moments import decode_signed, encode_signed  # noqa: E402


def _through_4bit(x: torch.Tensor, code: str = "linear2", block: int = 256) -> torch.Tensor:
    """What the 4-bit signed moment gives back for ``x`` (default: Linear-2 code, blocks of 256)."""
    batch = x.reshape(1, -1)
    return decode_signed(encode_signed(batch, True, code, block), batch.shape, code).reshape(x.shape)


def _stochastic_4bit(x: torch.Tensor, code: str, block: int, gen: torch.Generator) -> torch.Tensor:
    """Unbiased (stochastic) rounding of ``x`` to the code's levels over fp32 block absmax scales: each entry goes
    to the level above with the probability of its distance from the level below, so E[result] = x."""
    from hf_q4shampoo.quant import get_code  # noqa: PLC0415

    table = get_code(code)[0]
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    scale = blocks.abs().amax(1, keepdim=True).clamp_min(1e-30)
    y = (blocks / scale).clamp(-1, 1)
    hi = torch.bucketize(y, table).clamp(1, len(table) - 1)
    lo_v, hi_v = table[hi - 1], table[hi]
    up = torch.rand(y.shape, generator=gen) < (y - lo_v) / (hi_v - lo_v)
    out = torch.where(up, hi_v, lo_v) * scale
    return out.reshape(-1)[: flat.numel()].reshape(x.shape)


class ProbeShampoo(Mini):
    """``Mini`` (matrices only, as the family's least-squares problems have) with the momentum's storage and the
    preconditioned-momentum order as switches."""

    def __init__(self, params, lr, mq=0, exactnorm=0, code="linear2", block=256, ef=0, sr=0, **kw):
        graft = kw.get("graft", "ds")
        self.pre_momentum = graft == "dspre"
        if self.pre_momentum:
            kw["graft"] = "ds"
        super().__init__(params, lr, **kw)
        self.mq = int(mq)
        self.exact_norm = int(exactnorm)
        self.code, self.block, self.ef = code, int(block), int(ef)
        self.stochastic = int(sr)
        self.gen = torch.Generator().manual_seed(0)

    def _stored(self, u: torch.Tensor, s: dict) -> torch.Tensor:
        """What the 4-bit state keeps of the new U (rounded to nearest or stochastically; with ``ef``, of U plus
        the error the last rounding left, which an fp32 buffer keeps: a diagnosis, not a 4-bit state)."""
        target = u + s["e"] if self.ef and "e" in s else u
        if self.stochastic:
            kept = _stochastic_4bit(target, self.code, self.block, self.gen)
        else:
            kept = _through_4bit(target, self.code, self.block)
        if self.ef:
            s["e"] = target - kept
        return kept

    @torch.no_grad()
    def step(self):
        if not self.pre_momentum:
            super().step()
            if self.mq:
                for group in self.param_groups:
                    for p in group["params"]:
                        s = self.state[p]
                        s["m"].copy_(_through_4bit(s["m"], self.code, self.block))
            return
        o = self.o
        b1, b2 = o["betas"]
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad.float()
                if g.dim() != 2:
                    raise ValueError("the probe's dspre order takes matrices only")
                s = self.state[p]
                if not s:
                    self._init_state(s, g, pre=True, matrix=True)
                    s["u"] = torch.zeros_like(g)
                s["t"] += 1
                t = s["t"]
                old = self._statistics(s, g)
                if old is not None:  # U was P_old(M): carry it to P_new(M) = P_new P_old^-1 U
                    m = torch.linalg.solve(old[0], torch.linalg.solve(old[1], s["u"].T).T)
                    s["u"] = s["r"][0] @ m @ s["r"][1]
                s["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                vhat_sqrt = (s["v"] / (1 - b2**t)).sqrt().add_(o["adam_eps"])
                u = s["u"] * b1 + (1 - b1) * (s["r"][0] @ g @ s["r"][1])
                # as in the optimizer (and the ds / norm modes here): the step uses the new U, the state keeps its code
                s["u"] = self._stored(u, s) if self.mq else u
                s["m"].mul_(b1).add_(g, alpha=1 - b1)
                u_hat = u / (1 - b1**t)
                if self.exact_norm:
                    m_hat = s["m"] / (1 - b1**t)
                else:
                    m_hat = torch.linalg.solve(s["r"][0], torch.linalg.solve(s["r"][1], u_hat.T).T)
                a = m_hat / vhat_sqrt
                d = u_hat * (a.norm() / (u_hat.norm() + 1e-16)) if t >= o["root_freq"] else a
                p.add_(d.to(p.dtype), alpha=-group["lr"])


def _options(text: str) -> dict:
    return dict(kv.split("=", 1) for kv in text.split(";") if kv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="ls_k1e4_256x128,ls_k1e6_256x128,ls_k1e4_128x128,ls_k1e8_128x128")
    ap.add_argument("--variants", nargs="+", required=True, help="NAME:key=value;... (ProbeShampoo options)")
    ap.add_argument("--lrs", default=None, help="comma-separated; default: hard_conditioning.LS_LRS")
    ap.add_argument("--root_freq", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else list(hc.LS_LRS)
    variants = {text.partition(":")[0]: _options(text.partition(":")[2]) for text in args.variants}
    hc.make_optimizer = lambda spec, params, lr: ProbeShampoo(params, lr, root_freq=args.root_freq, **spec)
    results: dict[str, dict] = {}
    for name in args.problems.split(","):
        problem = hc.Problem(name)
        for label, options in variants.items():
            t0 = time.time()
            res = hc.grid(problem, options, lrs, args.steps)
            results.setdefault(name, {})[label] = res
            took = time.time() - t0
            print(f"{name:22s} {label:14s} best lr {res['best_lr']:<6g} loss {res['loss']:.4g}  ({took:.0f} s)")
    if args.json:
        record = dict(
            command="python benchmarks/filtered_momentum_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
            machine=f"{platform.machine()} CPU, 1 torch thread, torch {torch.__version__}",
            date=time.strftime("%Y-%m-%d"),
            results=results,
        )
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
