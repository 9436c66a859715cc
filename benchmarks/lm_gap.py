"""Issue 14: narrow the gap between our fp32 Shampoo and Distributed Shampoo on quality_cpu.py's LM task.

``mini``: a small reference Shampoo written out here, whose every difference between the two algorithms is a
switch (defaults: Distributed Shampoo's algorithm as quality_cpu.py configures it):

    graft   ds     : precondition the bias-corrected momentum M of G; graft per block to ||M / (sqrt(V)+eps)||
                     (Distributed Shampoo's Adam grafting; V the Adam second moment of G, bias-corrected)
            norm   : precondition G; graft per tensor to ||G||; then AdamW on the result (our grafting="norm")
            adam   : precondition G; graft per block to ||G / (sqrt(V)+eps)||; momentum of the result (our "adam")
    sbeta   factor EMA beta (DS run: 0.999; ours 0.95)
    sbc     1: divide the factors by 1 - beta^t before the root (DS); 0: not (ours)
    init    initial factors: 0 (DS) or the ridge (ours: matrix_eps I)
    eps     ridge; erel 0: absolute eps (DS 1e-12); erel 1: eps * lambda_max (ours, 1e-6)
    vec     1: precondition 1-D tensors with one full factor, exponent -1/2 (DS); 0: plain Adam(W) (ours)
    vreset  1 (graft=norm): restart AdamW's v (and its bias correction) at a matrix's first root
    spread  1: each matrix's roots at t = 20 j + k with our refresh_spread's offsets k (0-8 here); 0: k = 0 (DS)
    pre0    before the first root: 'adam' (Adam step of M, DS) (ours' norm mode is AdamW of G: the same)

Prints the training loss every 10 steps (mean of the last 10) and the validation loss.

    PYTHONPATH=.:/tmp/dshampoo python benchmarks/lm_gap.py --seed 1 --opt "mini:graft=norm"
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

import quality_cpu as q  # noqa: E402


class Mini(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr,
        graft="ds",
        sbeta=0.999,
        sbc=1,
        init=0,
        eps=1e-12,
        erel=0,
        vec=1,
        betas=(0.9, 0.999),
        adam_eps=1e-8,
        root_freq=20,
        root_dtype="float32",
        spread=0,
        vreset=0,
    ):
        super().__init__(params, dict(lr=lr))
        # spread=1: our refresh_spread's root offsets on this model (matrices in order), roots at t - k = 20 j
        self.offsets = iter([6, 8, 4, 7, 0, 2, 5, 7, 1, 3] if int(spread) else [])
        self.o = dict(
            graft=graft,
            sbeta=float(sbeta),
            sbc=int(sbc),
            init=int(init),
            eps=float(eps),
            erel=int(erel),
            vec=int(vec),
            betas=betas,
            adam_eps=adam_eps,
            root_freq=int(root_freq),
            vreset=int(vreset),
            root_dtype=getattr(torch, root_dtype),
        )

    def _root(self, f, t, exponent):
        o = self.o
        a = f / (1 - o["sbeta"] ** t) if o["sbc"] else f
        a = a.to(o["root_dtype"])
        w, q_ = torch.linalg.eigh(a)
        if o["erel"]:
            w = w.clamp_min(0) + o["eps"] * w.max().clamp_min(0)
        else:  # Distributed Shampoo's perturbation: lift a negative minimum to 0, then add eps
            w = w - min(float(w.min()), 0.0) + o["eps"]
        return ((q_ * w.pow(-exponent)) @ q_.T).float()

    def _init_state(self, s: dict, g2: torch.Tensor, pre: bool, matrix: bool) -> None:
        """A tensor's first state: step count, Adam moments, and (``pre``) factors and identity roots."""
        o = self.o
        s["t"] = 0
        s["m"] = torch.zeros_like(g2)
        s["v"] = torch.zeros_like(g2)
        if pre:
            s["f"] = [torch.eye(n) * (o["eps"] if o["init"] else 0.0) for n in g2.shape]
            s["r"] = [torch.eye(n) for n in g2.shape]
        s["k"] = next(self.offsets, 0) if matrix else 0

    def _statistics(self, s: dict, g2: torch.Tensor) -> list[torch.Tensor] | None:
        """The factors' EMA with this step's gradient, and the roots anew when due (step ``s["t"]``). Returns the
        roots they replace on a refresh, else None."""
        o = self.o
        grams = [g2 @ g2.T, g2.T @ g2] if g2.dim() == 2 else [torch.outer(g2, g2)]
        for f, gm in zip(s["f"], grams):
            f.mul_(o["sbeta"]).add_(gm, alpha=1 - o["sbeta"])
        t = s["t"]
        if t <= s["k"] or (t - s["k"]) % o["root_freq"]:
            return None
        old = s["r"]
        s["r"] = [self._root(f, t, 1 / (2 * g2.dim())) for f in s["f"]]
        return old

    @torch.no_grad()
    def step(self):
        o = self.o
        b1, b2 = o["betas"]
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                s = self.state[p]
                shape = g.shape
                g2 = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g
                matrix = g2.dim() == 2 and g2.numel() >= 64
                pre = matrix or (g2.dim() == 1 and o["vec"])
                if not s:
                    self._init_state(s, g2, pre, matrix)
                s["t"] += 1
                t = s["t"]
                if pre:
                    self._statistics(s, g2)
                ready = pre and t >= o["root_freq"] + s["k"]
                s["v"].mul_(b2).addcmul_(g2, g2, value=1 - b2)
                vhat_sqrt = (s["v"] / (1 - b2**t)).sqrt().add_(o["adam_eps"])

                def shampoo(x, roots):
                    return roots[0] @ x @ roots[1] if x.dim() == 2 else roots[0] @ x

                graft = o["graft"] if ready else ("norm" if o["graft"] == "norm" else "ds")
                if graft == "ds" or not pre:
                    # momentum first; Shampoo (if ready) at the Adam step's norm. 1-D without Shampoo: Adam.
                    s["m"].mul_(b1).add_(g2, alpha=1 - b1)
                    mhat = s["m"] / (1 - b1**t)
                    a = mhat / vhat_sqrt
                    d = a
                    if ready:
                        ps = shampoo(mhat, s["r"])
                        d = ps * (a.norm() / (ps.norm() + 1e-16))
                elif graft == "norm":
                    # ours: G~ = Shampoo(G) at ||G||, then AdamW on G~ (v of G~, not of G)
                    gt = g2
                    if ready:
                        ps = shampoo(g2, s["r"])
                        gt = ps * (g2.norm() / (ps.norm() + 1e-12))
                    if "vn" not in s or (o["vreset"] and pre and t == o["root_freq"] + s["k"]):
                        s["vn"], s["tv"] = torch.zeros_like(g2), 0  # vreset: v of G~ anew at the first root
                    s["tv"] += 1
                    s["m"].mul_(b1).add_(gt, alpha=1 - b1)
                    s["vn"].mul_(b2).addcmul_(gt, gt, value=1 - b2)
                    d = (s["m"] / (1 - b1**t)) / ((s["vn"] / (1 - b2 ** s["tv"])).sqrt() + o["adam_eps"])
                elif graft == "adam":
                    a = g2 / vhat_sqrt
                    ps = shampoo(g2, s["r"])
                    gt = ps * (a.norm() / (ps.norm() + 1e-12))
                    s["m"].mul_(b1).add_(gt, alpha=1 - b1)
                    d = s["m"] / (1 - b1**t)
                else:
                    raise ValueError(graft)
                p.add_(d.reshape(shape).to(p.dtype), alpha=-lr)


def lm_traced(make_opt, seed, steps=400, batch=16, ctx=64):
    """quality_cpu.lm with the training loss recorded (same data, model and schedule)."""
    trace: list[float] = []
    return q.lm(make_opt, seed, steps, batch, ctx, trace=trace), trace


def maker(spec, lr, schedule):
    if spec.startswith("mini"):
        kw = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(";") if kv) if ":" in spec else {}
        return lambda params, steps: Mini(params, lr, root_freq=schedule["root_freq"], **kw)
    if spec.startswith("ds"):  # "ds" or "ds:key=value;..." (DistributedShampoo keywords, python literals)
        import distributed_shampoo as ds

        kw = {}
        if ":" in spec:
            for kv in spec.split(":", 1)[1].split(";"):
                k, v = kv.split("=", 1)
                kw[k] = eval(v, {"ds": ds})  # noqa: S307 (an experiment's own command line)
        beta2 = kw.pop("beta2", 0.999)
        return lambda params, steps: q._distributed_shampoo(params, lr, schedule, beta2, **kw)
    return q.maker(spec.split(":", 1)[1] if spec.startswith("ours:") else spec, lr, schedule)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,3")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--opt", required=True, help="mini[:k=v;...] | ds[:k=v;...] | ours:<quality_cpu spec>")
    ap.add_argument("--schedule", default="update_freq=1;root_freq=20;first_root_step=0")
    ap.add_argument("--out", default=None, help="append one JSON line per seed here")
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    schedule = q.parse_optim_args(args.schedule.replace(";", ","))
    for seed in [int(s) for s in args.seeds.split(",")]:
        t0 = time.time()
        val, trace = lm_traced(maker(args.opt, args.lr, schedule), seed)
        row = {"opt": args.opt, "lr": args.lr, "seed": seed, "val": val, "s": round(time.time() - t0), "trace": trace}
        print(f"{args.opt} seed {seed}: {val:.4f} ({row['s']} s)" + (f"  {trace}" if args.trace else ""), flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
