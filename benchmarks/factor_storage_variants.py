"""Storage variants of the Cholesky factor that did not become options, measured with the diagnostic of
``hard_conditioning.py`` (issue 14, item 2; numbers in docs/results.md §4).

Each variant is a prototype form that keeps the *dequantized* factor in fp32 between updates (so only the
arithmetic of the encoding is modelled, not its byte layout) and, where it needs one, an fp32 error state:

* ``sr``: stochastic rounding of the 4-bit code (unbiased per entry);
* ``diagfix``: the stored diagonal chosen so that ``diag(C~ C~^T) = diag(C C^T)`` exactly;
* ``debias``: ``diag(sum_j (C~_ij - C_ij)^2)`` (n floats) subtracted from the reconstruction, i.e. the
  expectation of the quadratic error term removed;
* ``stat_ef``: error feedback in statistics space: ``A - C~ C~^T`` kept as a symmetric 4-bit matrix (fp32
  diagonal) and added back;
* ``refine_ef``: the two-code factor of ``factor_upper="refine"`` *plus* an fp32 error-feedback state (not
  storable at 4-bit cost: the bound of what feedback would add to refinement);
* ``refine_u0``: the second code with a uniform table (zero, 7 negative and 8 positive levels) instead of
  Linear-2.

    python benchmarks/factor_storage_variants.py [--problem ls_k1e6_256x128] [--side R]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hard_conditioning as hc  # noqa: E402

from hf_q4shampoo import linalg  # noqa: E402
from hf_q4shampoo.preconditioners import CholeskyForm  # noqa: E402
from hf_q4shampoo.quant import get_code, roundtrip_blockwise  # noqa: E402

UNIFORM0 = torch.cat([torch.linspace(-1, 0, 8)[:-1], torch.linspace(0, 1, 9)])


def _roundtrip(x: torch.Tensor, table: torch.Tensor, block: int = 64, generator=None) -> torch.Tensor:
    """Block-absmax quantization to ``table`` (nearest, or stochastic with ``generator``), decoded."""
    n = x.shape[-1]
    blocks = torch.nn.functional.pad(x, (0, (-n) % block)).reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    v = (blocks / torch.where(amax > 0, amax, torch.ones_like(amax))).clamp(float(table[0]), float(table[-1]))
    if generator is None:
        q = table[torch.bucketize(v, (table[1:] + table[:-1]) / 2)]
    else:
        hi = torch.bucketize(v, table).clamp(1, len(table) - 1)
        lo, up = table[hi - 1], table[hi]
        p = ((v - lo) / (up - lo)).clamp(0, 1)
        q = torch.where(torch.rand(v.shape, generator=generator) < p, up, lo)
    return (q * amax).reshape(*x.shape[:-1], -1)[..., :n]


class Prototype(CholeskyForm):
    """The factor kept decoded (``cbar``); ``encode`` says how a fresh factor is quantized."""

    def __init__(self, settings, kind: str):
        super().__init__(settings, error_feedback=False)
        self.kind = kind
        self.gen = torch.Generator().manual_seed(0)
        self.table = get_code(settings.quant_map)[0]

    def init_state(self, n, k, device):
        state = {
            "cbar": (self.s.matrix_eps**0.5) * torch.eye(n).expand(k, n, n).clone(),
            "ridge": torch.zeros(k),
            "err": torch.zeros(k, n, n),
            "serr": torch.zeros(k, n, n),
            "b": torch.zeros(k, n),
        }
        state["root"] = torch.eye(n).expand(k, n, n).contiguous()  # fp32 roots: only the factor's storage varies
        return state

    def statistics(self, st):
        out = st["cbar"] @ st["cbar"].mT + st["serr"]
        return out - torch.diag_embed(st["b"])

    def _q(self, x, table=None, stochastic=False):
        return torch.tril(
            _roundtrip(x, self.table if table is None else table, generator=self.gen if stochastic else None), -1
        )

    def update_statistics(self, st, gram):
        n = gram.shape[-1]
        old = self.statistics(st) - st["ridge"][:, None, None] * torch.eye(n)
        c, ridge = linalg.robust_cholesky(self._blend(old, gram), self.s.cholesky_eps)
        d, off = c.diagonal(dim1=-2, dim2=-1), torch.tril(c, -1)
        kind = self.kind
        if kind in ("refine_ef", "refine_u0"):
            x = off + (st["err"] if kind == "refine_ef" else 0)
            q1 = self._q(x)
            q = q1 + self._q(torch.tril(x, -1) - q1, UNIFORM0 if kind == "refine_u0" else None)
            if kind == "refine_ef":
                st["err"] = torch.tril(x, -1) - q
        else:
            q = self._q(off, stochastic=kind == "sr")
        cbar = q + torch.diag_embed(d)
        if kind == "diagfix":
            target = (c * c).sum(-1)
            dd = (target - (q * q).sum(-1)).clamp_min((0.01 * d) ** 2).sqrt()
            cbar = q + torch.diag_embed(dd)
        if kind == "debias":
            st["b"] = ((cbar - c) ** 2).sum(-1)
        if kind == "stat_ef":
            r = c @ c.mT - cbar @ cbar.mT
            lo = torch.tril(roundtrip_blockwise(torch.tril(r, -1)), -1)
            st["serr"] = lo + lo.mT + torch.diag_embed(r.diagonal(dim1=-2, dim2=-1))
        st["cbar"], st["ridge"] = cbar, ridge


KINDS = ("plain", "sr", "diagfix", "debias", "stat_ef", "refine_u0", "refine_ef")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default="ls_k1e6_256x128")
    ap.add_argument("--side", default="R")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    variants = {
        "cholesky": {"precond": "cholesky"},
        "cholesky_ef": {"precond": "cholesky_ef"},
        "refine": {"precond": "cholesky_ef", "factor_upper": "refine"},
    }
    variants.update({f"prototype {k}": (lambda s, k=k: Prototype(s, k)) for k in KINDS})
    hc.print_diagnosis(hc.diagnose(args.problem, variants, side=args.side))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
