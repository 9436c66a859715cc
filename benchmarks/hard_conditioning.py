"""Hard-conditioning family (issue 14, item 1): where does the 4-bit state lose Shampoo's gain?

Problems (all regression with mean squared error, inputs ``x = z S^(1/2) Q^T`` with ``z`` standard normal,
``Q`` a random orthogonal basis and ``S`` log-spaced from 1 down to ``1/kappa``, so the input covariance has
condition number ``kappa`` and no axis-aligned structure a diagonal method could exploit):

* ``ls_k{kappa}_{out}x{in}``: linear least squares, one weight ``(out, in)`` (no bias), teacher ``W*`` with
  unit-variance entries, targets ``x W*^T`` plus noise of 1e-3 of their standard deviation (so the loss
  floor is far below what 200 steps reach and the loss measures optimisation, not noise);
* ``mlp_{whitened|raw}_k{kappa}``: a tanh MLP ``in -> hidden -> out`` (with biases) fitted to a random tanh
  teacher on the same inputs, raw (condition number kappa) or whitened by the exact covariance (condition 1).

Each optimizer runs every learning rate of a 5-point grid (``LS_LRS`` / ``MLP_LRS``, or ``--lrs``), constant lr
after a 10-step warm-up,
full-batch loss at the end; its best lr counts. Optimizers: every ``precond`` form at both
``first_order_bits`` (``{form}/{bits}``), plain AdamW, and any ``--extra NAME:key=value;key=value`` variant
(Q4Shampoo options). Shampoo runs use ``update_freq=1`` and ``root_freq=10`` (statistics every step, so every
step re-quantizes the factors: the hardest case for the storage), ``--schedule`` changes that.

The diagnostic (``--diagnose``) replays the gradients of an fp32-Shampoo run of one problem through each
storage variant's statistics update (fp64 reference EMA alongside) and reports, in the eigenbasis of the exact
statistics, the error of the stored statistic and of its inverse root along the eigenvectors of the smallest
and the largest eigenvalues.

Commands (2-core CPU, ``OMP_WAIT_POLICY=PASSIVE``)::

    python benchmarks/hard_conditioning.py --json docs/results/hard_conditioning.json
    python benchmarks/hard_conditioning.py --problems ls_k1e6_256x128 --forms fp32,cholesky_ef --bits 4 \\
        --extra "ldl:precond=cholesky_ef;factor_scaling=column"
    python benchmarks/hard_conditioning.py --diagnose ls_k1e6_256x128
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

FORMS = ("fp32", "naive", "cholesky", "cholesky_ef", "eigen")
#: 5-point learning-rate grids (factor 2 apart, bracketing every optimizer's best on the family)
LS_LRS = (0.05, 0.1, 0.2, 0.4, 0.8)
MLP_LRS = (0.0025, 0.005, 0.01, 0.02, 0.04)
DEFAULT_PROBLEMS = (
    "ls_k1e2_256x128",
    "ls_k1e4_256x128",
    "ls_k1e6_256x128",
    "ls_k1e8_256x128",
    "ls_k1e2_128x128",
    "ls_k1e4_128x128",
    "ls_k1e6_128x128",
    "ls_k1e8_128x128",
    "mlp_raw_k1e4",
    "mlp_whitened_k1e4",
)


# ------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------


def _inputs(n: int, d: int, kappa: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, covariance)``: n samples of dimension d with covariance ``Q diag(logspace(0, -log10 kappa)) Q^T``."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    s = torch.logspace(0, -math.log10(kappa), d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (q * s.sqrt()) @ q.T
    return x, (q * s) @ q.T


class Problem:
    """Data and model factory of one problem of the family."""

    def __init__(self, name: str, seed: int = 0, n: int = 4096):
        self.name = name
        g = torch.Generator().manual_seed(1000 + seed)
        parts = name.split("_")
        if parts[0] == "ls":
            kappa = float(parts[1][1:])
            out, inp = (int(v) for v in parts[2].split("x"))
            x, _ = _inputs(n, inp, kappa, g)
            w = torch.randn(out, inp, generator=g, dtype=torch.float64)
            y = x @ w.T
            y = y + 1e-3 * y.std() * torch.randn(y.shape, generator=g, dtype=torch.float64)
            self.dims = (inp, out)
            self.hidden = None
        elif parts[0] == "mlp":
            kappa = float(parts[2][1:])
            inp, hidden, out = 64, 128, 32
            x, cov = _inputs(n, inp, kappa, g)
            w1 = torch.randn(hidden, inp, generator=g, dtype=torch.float64) / math.sqrt(inp) * 3
            w2 = torch.randn(out, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
            # the teacher sees whitened-scale inputs so both variants have the same targets' difficulty
            evals, evecs = torch.linalg.eigh(cov)
            whiten = (evecs * evals.rsqrt()) @ evecs.T
            y = torch.tanh(x @ whiten @ w1.T) @ w2.T
            y = y + 1e-3 * y.std() * torch.randn(y.shape, generator=g, dtype=torch.float64)
            if parts[1] == "whitened":
                x = x @ whiten
            self.dims = (inp, out)
            self.hidden = hidden
        else:
            raise ValueError(f"unknown problem {name!r}")
        self.x, self.y = x.float(), y.float()
        self.seed = seed

    def model(self) -> torch.nn.Module:
        torch.manual_seed(2000 + self.seed)
        inp, out = self.dims
        if self.hidden is None:
            m = torch.nn.Linear(inp, out, bias=False)
            torch.nn.init.zeros_(m.weight)
            return m
        return torch.nn.Sequential(
            torch.nn.Linear(inp, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, out)
        )

    def loss(self, model: torch.nn.Module, idx: torch.Tensor | None = None) -> torch.Tensor:
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        return ((model(x) - y) ** 2).mean()


# ------------------------------------------------------------------------------------------------
# optimizers
# ------------------------------------------------------------------------------------------------


def optimizer_specs(forms, bits, extras, schedule, adamw=True) -> dict[str, dict]:
    """name -> Q4Shampoo options (or ``{"adamw": True}``)."""
    specs: dict[str, dict] = {}
    for b in bits:
        for f in forms:
            specs[f"{f}/{b}"] = dict(precond=f, first_order_bits=b, **schedule)
    for text in extras:
        name, _, opts = text.partition(":")
        options = parse_optim_args(opts.replace(";", ","))
        specs[name] = {**schedule, **options}
    if adamw:
        specs["adamw"] = {"adamw": True}
    return specs


def make_optimizer(spec: dict, params, lr: float):
    if spec.get("adamw"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return Q4Shampoo(params, lr=lr, **spec)


def run(
    problem: Problem, spec: dict, lr: float, steps: int = 200, batch: int = 256, warmup: int = 10, record=None
) -> float:
    """Final full-batch loss of one run (inf if it diverged)."""
    model = problem.model()
    opt = make_optimizer(spec, model.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup))
    g = torch.Generator().manual_seed(3000 + problem.seed)
    for _ in range(steps):
        idx = torch.randint(0, problem.x.shape[0], (batch,), generator=g)
        loss = problem.loss(model, idx)
        opt.zero_grad()
        loss.backward()
        if record is not None:
            record(model)
        opt.step()
        sched.step()
        if not math.isfinite(float(loss.detach())):
            return float("inf")
    with torch.no_grad():
        final = float(problem.loss(model))
    return final if math.isfinite(final) else float("inf")


def grid(problem: Problem, spec: dict, lrs, steps: int) -> dict:
    losses = {lr: run(problem, spec, lr, steps) for lr in lrs}
    best = min(losses, key=losses.get)
    return {"best_lr": best, "loss": losses[best], "losses": {f"{k:g}": v for k, v in losses.items()}}


# ------------------------------------------------------------------------------------------------
# diagnostic: error of the stored statistic and root along the small-eigenvalue eigenvectors
# ------------------------------------------------------------------------------------------------


def _root64(a: torch.Tensor, eps: float) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(a)
    lam = lam.clamp_min(0)
    return (vec * (lam + eps * lam.max()).pow(-0.25)) @ vec.T


def record_gradients(problem_name: str, steps: int = 200, lr: float = 0.2) -> list[torch.Tensor]:
    """The weight gradients of an fp32-Shampoo run (fp32 moments, the family's schedule) of a least-squares problem."""
    problem = Problem(problem_name)
    grads: list[torch.Tensor] = []

    def record(model):
        w = next(p for p in model.parameters() if p.dim() == 2)
        grads.append(w.grad.detach().clone())

    run(problem, dict(precond="fp32", first_order_bits=32, update_freq=1, root_freq=10), lr, steps, record=record)
    return grads


def diagnose(problem_name: str, variants: dict, steps: int = 200, lr: float = 0.2, side: str = "R") -> dict:
    """Replay one fp32-Shampoo run's gradients through each variant's statistics storage.

    ``variants`` maps a name to Q4Shampoo options (``precond`` and the form's settings) or to a callable
    ``FormSettings -> PreconditionerForm`` (prototypes). Returns, per variant, the signed relative error of the
    stored statistic ``u^T (A~ - A) u / lambda`` and of its root ``u^T (f(A~) - f(A)) u / u^T f(A) u`` (f: the
    inverse 4th root with the relative ridge 1e-6), averaged over the eigenvectors u of the smallest 10% and
    the largest 10% eigenvalues of the exact (fp64) EMA A, plus the root's NRE, at the end of the run. Also the
    single-shot decomposition of quantizing ``chol(A)`` once (see :func:`single_shot`).
    """
    from hf_q4shampoo.config import Q4ShampooConfig
    from hf_q4shampoo.preconditioners import FormSettings, make_form

    grads = record_gradients(problem_name, steps, lr)
    beta, eps = 0.95, 1e-6
    n = grads[0].shape[1] if side == "R" else grads[0].shape[0]
    exact = eps * torch.eye(n, dtype=torch.float64)
    grams = []
    for gr in grads:
        gr = gr.double()
        gram = gr.T @ gr if side == "R" else gr @ gr.T
        grams.append(gram)
        exact = beta * exact + (1 - beta) * gram
    lam, vec = torch.linalg.eigh(exact)
    k = max(1, n // 10)
    f_exact = _root64(exact, eps)
    out = {
        "problem": problem_name,
        "side": side,
        "order": n,
        "steps": steps,
        "condition": float(lam.max() / lam.clamp_min(1e-300).min()),
        "variants": {},
        "single_shot": {s: single_shot(exact, s) for s in ("row", "column")},
    }
    for name, opts in variants.items():
        if callable(opts):
            # prototypes build on paper 1's layout (row scaling, feedback), as they did when measured
            form = opts(FormSettings.from_options(factor_scaling="row", factor_upper="feedback"))
        else:
            fields = {k2: v for k2, v in opts.items() if k2 in Q4ShampooConfig.__dataclass_fields__}
            fields.setdefault("factor_scaling", "row")
            fields.setdefault("factor_upper", "feedback")
            form = make_form(opts.get("precond", "cholesky_ef"), FormSettings.from_options(**fields))
        state = form.init_state(n, 1, torch.device("cpu"))
        for gram in grams:
            form.update_statistics(state, gram.float().unsqueeze(0))
        stored = form.statistics(state)[0].double()
        f_stored = _root64(stored, eps)
        stat_err = (vec.T @ (stored - exact) @ vec).diagonal() / lam
        fe = (vec.T @ f_exact @ vec).diagonal()
        root_err = (vec.T @ (f_stored - f_exact) @ vec).diagonal() / fe
        nre = float(torch.linalg.matrix_norm(f_stored - f_exact) / torch.linalg.matrix_norm(f_exact))
        out["variants"][name] = {
            "stat_err_small": float(stat_err[:k].mean()),
            "stat_err_large": float(stat_err[-k:].mean()),
            "root_err_small": float(root_err[:k].mean()),
            "root_err_large": float(root_err[-k:].mean()),
            "root_nre": nre,
        }
    return out


def single_shot(a: torch.Tensor, scaling: str = "row") -> dict:
    """Quantize ``C = chol(A + 1e-6 max(diag A) I)`` once (4-bit Linear-2, blocks of 64, diagonal exact) and
    split the statistic's error along the eigenvectors u of the smallest 10% eigenvalues, relative to them:
    ``u^T (C~ C~^T - C C^T) u = 2 (C^T u).(dC^T u)`` (linear) ``+ |dC^T u|^2`` (quadratic, >= 0), and the
    quadratic term minus its expectation over random directions (``sum_i u_i^2 |dC_i|^2``)."""
    from hf_q4shampoo.quant import roundtrip_blockwise

    n = a.shape[-1]
    lam, vec = torch.linalg.eigh(a)
    k = max(1, n // 10)
    c = torch.linalg.cholesky(a + 1e-6 * a.diagonal().max() * torch.eye(n, dtype=a.dtype))
    d = c.diagonal()
    off = torch.tril(c, -1) / (d.unsqueeze(0) if scaling == "column" else 1.0)
    q = torch.tril(roundtrip_blockwise(off.float()).double(), -1) * (d.unsqueeze(0) if scaling == "column" else 1.0)
    dc = q + torch.diag(d) - c
    linear = 2 * ((vec.T @ c) * (vec.T @ dc)).sum(1) / lam
    quad = ((vec.T @ dc) ** 2).sum(1) / lam
    centred = quad - (vec**2).T @ (dc**2).sum(1) / lam
    return {
        "linear_small": float(linear[:k].mean()),
        "quadratic_small": float(quad[:k].mean()),
        "quadratic_minus_diagonal_small": float(centred[:k].mean()),
    }


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def print_diagnosis(res: dict) -> None:
    print(f"{res['problem']} side {res['side']} (order {res['order']}, condition {res['condition']:.2g})")
    for scaling, r in res["single_shot"].items():
        print(
            f"single shot, {scaling} scaling, small 10%: linear {r['linear_small']:+.3g}, quadratic "
            f"{r['quadratic_small']:+.3g}, quadratic minus its diagonal {r['quadratic_minus_diagonal_small']:+.3g}"
        )
    print(
        "| variant | stat err, small 10% | stat err, large 10% | root err, small 10% | root err, large 10% | root NRE |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in res["variants"].items():
        print(
            f"| {name} | {r['stat_err_small']:+.3g} | {r['stat_err_large']:+.3g} | {r['root_err_small']:+.3g} | "
            f"{r['root_err_large']:+.3g} | {r['root_nre']:.3g} |"
        )


def _table(results: dict, names: list[str], problems: list[str]) -> str:
    ref4, ref32 = "fp32/4", "fp32/32"
    lines = ["| problem | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in problems:
        row = results[p]
        cells = []
        for nm in names:
            r = row.get(nm)
            if r is None:
                cells.append("")
                continue
            ref = row.get(ref4 if nm.endswith("/4") else ref32) or row.get(ref32)
            ratio = f" ({r['loss'] / ref['loss']:.2f}x)" if ref and ref["loss"] > 0 and nm not in (ref4, ref32) else ""
            cells.append(f"{r['loss']:.4g}{ratio}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default=",".join(DEFAULT_PROBLEMS))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--bits", default="32,4")
    ap.add_argument("--lrs", default=None, help="comma-separated grid for every problem (default: LS_LRS / MLP_LRS)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--schedule", default="update_freq=1,root_freq=10")
    ap.add_argument("--extra", action="append", default=[], help="NAME:key=value;key=value (Q4Shampoo options)")
    ap.add_argument("--no-adamw", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--diagnose", default=None, help="problem name: run the storage diagnostic instead")
    ap.add_argument("--side", default="R")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    schedule = parse_optim_args(args.schedule)
    if args.diagnose:
        variants = {
            "fp32": {"precond": "fp32"},
            "naive": {"precond": "naive"},
            "cholesky": {"precond": "cholesky"},
            "cholesky_ef": {"precond": "cholesky_ef"},
            "eigen": {"precond": "eigen"},
        }
        for text in args.extra:
            name, _, opts = text.partition(":")
            variants[name] = parse_optim_args(opts.replace(";", ","))
        t0 = time.time()
        res = diagnose(args.diagnose, variants, args.steps, side=args.side)
        print_diagnosis(res)
        print(f"({time.time() - t0:.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0

    forms = [f for f in args.forms.split(",") if f]
    bits = [int(b) for b in args.bits.split(",") if b]
    given = [float(v) for v in args.lrs.split(",")] if args.lrs else None
    specs = optimizer_specs(forms, bits, args.extra, schedule, adamw=not args.no_adamw)
    problems = [p for p in args.problems.split(",") if p]
    results: dict[str, dict] = {}
    t0 = time.time()
    for pname in problems:
        problem = Problem(pname)
        results[pname] = {}
        lrs = given or (MLP_LRS if pname.startswith("mlp") else LS_LRS)
        for name, spec in specs.items():
            results[pname][name] = grid(problem, spec, lrs, args.steps)
            r = results[pname][name]
            print(
                f"{pname:22s} {name:24s} best lr {r['best_lr']:<6g} loss {r['loss']:.4g}  "
                f"[{', '.join(f'{v:.3g}' for v in r['losses'].values())}]  ({time.time() - t0:.0f} s)",
                flush=True,
            )
    names = list(specs)
    print()
    print(_table(results, names, problems))
    if args.json:
        lrs = given or {"ls": LS_LRS, "mlp": MLP_LRS}
        write_result(args.json, steps=args.steps, lrs=lrs, schedule=schedule, specs=specs, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
