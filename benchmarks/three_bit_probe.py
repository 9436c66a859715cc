"""Issue 14: what would other root and v storage cost or gain in quality? (simulated, before building any storage)

``root3``: every Q4Shampoo created in this process stores its quantized inverse roots with the 8-entry Linear-2
table (``quant.linear2_code(3)``) instead of the 16-entry one. ``v3`` / ``v3sq`` / ``v3geo``: Adam's second moment
uses an 8-entry zero-free table (``V_TABLES``: linear, squares of linear, powers of two), each entry repeated so
the 16-entry 4-bit path (the Triton kernels included) runs it. ``refine3``: the residual code of the default
factor storage (the upper triangle of ``cholesky_ef``'s buffer, 43.3 MiB on GPT-2 small) with 8 of the 16 Linear-2
entries (CPU path only: the Triton factor kernels are not patched). The codes still take a nibble each: the quality
is that of 3-bit storage, the memory is not. ``v4geo`` / ``v4geo_half``: v with a 16-entry log-spaced table
(powers of 2, or of sqrt(2)) instead of the linear zero-free one: a 4-bit alternative, not a memory lever.
``scale8`` / ``scale8n``: every block scale on an 8-bit log grid (16 steps
per octave) instead of bf16, rounded up / to the nearer point (issue 14's last memory lever, ~5 MiB on GPT-2 small;
CPU path only). ``rootcorr``: roots quantized in correlation form (``D^-1/2 X D^-1/2``, the fp32 diagonal restoring
the scale; same bytes). (Its first version also had ``root8``, roots with a second code of
the residual: that is now the option ``root_bits=8``, which gives the same losses.) Then one of the repo's quality
benchmarks runs with the other arguments:

    python benchmarks/three_bit_probe.py root3 quality_cpu --tasks lm --seeds 0,1,2,3,4,5 --lrs 3e-3 --json out.json
    python benchmarks/three_bit_probe.py v3geo hard_conditioning --forms cholesky_ef --bits 4 --no-adamw ...
    python benchmarks/three_bit_probe.py none quality_cpu ...        # no patch: the same run with today's codes

Benchmarks that train in child processes (``time_to_target.py``) get the patch through
``benchmarks/probe_site/sitecustomize.py``: ``THREE_BIT_PROBE=v3geo PYTHONPATH=$PWD:$PWD/benchmarks/probe_site
python benchmarks/time_to_target.py ...``.

A probe, not an option: the patches swap ``PreconditionerForm._store_root`` / ``.root`` and the code table
for the whole process.
"""

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from hf_q4shampoo import preconditioner_base as pb  # noqa: E402
from hf_q4shampoo import quant  # noqa: E402

CODE = "linear2_b3"


def use_table(name: str, make) -> None:
    """From now on the code table ``name`` (a new name, or one of quant's) is ``make()``: every probe below swaps or
    adds its table this way (before anything asks ``quant.get_code`` for it, which caches it)."""
    original = quant._code_cpu

    def code_cpu(asked: str, bits: int):
        return make() if asked == name else original(asked, bits)

    quant._code_cpu = code_cpu


def patch() -> None:
    use_table(CODE, lambda: quant.linear2_code(3))
    store, root = pb.PreconditionerForm._store_root, pb.PreconditionerForm.root

    def store3(self, x, n):
        if not self._root_quantized(n):
            return store(self, x, n)
        return {f"root_{key}": v for key, v in quant.quantize_symmetric(x, CODE, self.s.quant_block_size).items()}

    def root3(self, state, dtype=torch.float32):
        if "root" in state or state["root_diag"].shape[-1] < 2:
            return root(self, state, dtype)
        q = {key: state[f"root_{key}"] for key in ("codes", "scales", "diag")}
        return quant.dequantize_symmetric(q, CODE, self.s.quant_block_size, dtype)

    pb.PreconditionerForm._store_root = store3
    pb.PreconditionerForm.root = root3


V_TABLES = {  # 8-entry zero-free tables for v, in (0, 1]
    "v3": lambda: quant.zero_free_linear_code(3),  # (i + 1) / 8
    "v3sq": lambda: quant.zero_free_linear_code(3) ** 2,  # ((i + 1) / 8)^2: sqrt(v) linear
    "v3geo": lambda: 2.0 ** quant.torch.arange(-7.0, 1.0),  # 1/128 ... 1
}


def patch_root_correlation() -> None:
    """Roots stored in correlation form: ``C = D^-1/2 X D^-1/2`` (unit diagonal) is quantized instead of ``X``, and
    decoding multiplies back by ``sqrt(d_i d_j)`` from the fp32 diagonal (same bytes)."""
    store, root = pb.PreconditionerForm._store_root, pb.PreconditionerForm.root

    def scale_of(diag):
        s = diag.clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        return s.unsqueeze(-1) * s.unsqueeze(-2)

    def store_c(self, x, n):
        if not self._root_quantized(n):
            return store(self, x, n)
        x = x.float()
        diag = x.diagonal(dim1=-2, dim2=-1)
        q = quant.quantize_symmetric(x / scale_of(diag), self.s.quant_map, self.s.quant_block_size)
        q["diag"] = diag.clone()
        return {f"root_{key}": v for key, v in q.items()}

    def root_c(self, state, dtype=torch.float32):
        if "root" in state or state["root_diag"].shape[-1] < 2:
            return root(self, state, dtype)
        diag = state["root_diag"]
        q = {"codes": state["root_codes"], "scales": state["root_scales"], "diag": torch.ones_like(diag)}
        unit = quant.dequantize_symmetric(q, self.s.quant_map, self.s.quant_block_size)
        return (unit * scale_of(diag)).to(dtype)

    pb.PreconditionerForm._store_root = store_c
    pb.PreconditionerForm.root = root_c


#: 16-entry (4-bit) zero-free tables for v, in (0, 1]: relative precision at every scale instead of the linear
#: table's, whose lowest entry (1/16) stores anything below it at up to many times its value
V4_TABLES = {
    "v4geo": lambda: 2.0 ** quant.torch.arange(-15.0, 1.0),  # 2^-15 ... 1
    "v4geo_half": lambda: 2.0 ** (quant.torch.arange(-15.0, 1.0) / 2),  # 2^-7.5 ... 1, steps of sqrt(2)
}
#: how a value between two entries is rounded (suffix of the probe's name; none: to the nearer one, as the codec
#: does): ``_log`` to the nearer one in log space (equal relative error both ways), ``_up`` to the larger one
#: (v never under-estimated, so no step is larger than fp32 v would make it)
V4_ROUNDING = {
    "log": lambda t: (t[1:] * t[:-1]).sqrt(),
    "up": lambda t: t[:-1] * (1 + 1e-6),
}
V4_NAMES = [f"{t}{r}" for t in V4_TABLES for r in ("", *(f"_{k}" for k in V4_ROUNDING))]


def patch_v(which: str) -> None:
    rounding = next((r for r in V4_ROUNDING if which.endswith(f"_{r}")), "")
    table_name = which[: -len(rounding) - 1] if rounding else which
    if table_name in V4_TABLES:
        use_table("zero_free_linear", V4_TABLES[table_name])
    else:  # each entry twice: a 16-entry table, so the 4-bit Triton kernels (which read 15 midpoints) run it as well
        use_table("zero_free_linear", lambda: V_TABLES[which]().repeat_interleave(2))
    if rounding:  # the CPU codec reads its midpoints from get_code's cache: put the other ones there
        original_get = quant.get_code

        def get_code(name, device="cpu", bits=4):
            table, mids = original_get(name, device, bits)
            return (table, V4_ROUNDING[rounding](table)) if name == "zero_free_linear" else (table, mids)

        quant.get_code = get_code


#: 8 of the 16 Linear-2 entries, every other one and no zero: a 3-bit table whose codes the 4-bit storage holds
#: exactly (values snapped to it are re-encoded to the same entries), so a probe through it measures 3 bits, not
#: the double rounding of a 3-bit table that is not a subset
SUBSET_CODE = "linear2_every_other"
SUBSET_ENTRIES = (0, 2, 4, 6, 9, 11, 13, 15)


def patch_refine3() -> None:
    """``cholesky_ef``'s default factor storage (``factor_upper="refine"``) with the residual's code (the upper
    triangle of the factor's buffer) in 3 bits: the residual is snapped to :data:`SUBSET_CODE` with its own block
    absmax before the 4-bit encoding, which then stores exactly those values. The factor's first code stays 4-bit."""
    from hf_q4shampoo import cholesky_form  # noqa: PLC0415

    use_table(SUBSET_CODE, lambda: quant.linear2_code(4)[list(SUBSET_ENTRIES)])
    original = quant.quantize_lower_upper

    def quantize_lower_upper(lower, upper, code="linear2", block_size=64):
        snapped = quant.roundtrip_blockwise(torch.triu(upper.float(), 1), SUBSET_CODE, block_size)
        return original(lower, snapped, code, block_size)

    quant.quantize_lower_upper = quantize_lower_upper
    cholesky_form.quantize_lower_upper = quantize_lower_upper


#: steps per octave of the simulated 8-bit log-scale block scales (256 codes: 16 octaves below a per-tensor maximum);
#: ``SCALE_PROBE_STEPS=128`` (bf16's resolution, rounded up) is the control: how much the tasks move for a change of
#: the scales that costs no precision
SCALE_STEPS = int(os.environ.get("SCALE_PROBE_STEPS", "16"))


def patch_scale8(up: bool) -> None:
    """Block scales on an 8-bit log grid, ``2^(k / 16)``, instead of bf16 (CPU path only: the Triton kernels keep their
    own bf16 rounding). Every block absmax of the factor, root and m codes passes through ``quant.bf16_round``; here it
    is first snapped to the grid, rounded up (``up``: at most one 4.4% step above the block's absmax) or to the nearer
    point in log space (within 2.2% either way), then to bf16 as before so that the stored scale is the
    one the codes were divided by (today's bf16 rounding alone: within 0.39%; a scale below the absmax clips that
    entry). The grid is unbounded: a stored 8-bit code would also need a
    per-tensor exponent and covers 16 octaves below it."""
    original = quant.bf16_round

    def log_grid(x: torch.Tensor) -> torch.Tensor:
        pos = x > 0
        e = torch.log2(torch.where(pos, x, torch.ones_like(x))) * SCALE_STEPS
        e = torch.ceil(e - 1e-4) if up else torch.round(e)
        return original(torch.where(pos, torch.exp2(e / SCALE_STEPS), x))

    quant.bf16_round = log_grid


def patch_diag32() -> None:
    """The roots' diagonal kept exactly (fp32 values over a scale of 1) instead of fp16 over its largest entry:
    what 2-byte diagonals cost (docs/results.md §4.9)."""
    original = quant.normalised_diagonal

    def exact(diag: torch.Tensor) -> dict[str, torch.Tensor]:
        out = original(diag)
        return {"diag": diag.float(), "diag_scale": torch.ones_like(out["diag_scale"])}

    quant.normalised_diagonal = exact


def apply(which: str) -> None:
    """Install the patch named ``which`` (``none``: nothing)."""
    if which not in ("root3", "rootcorr", "refine3", "scale8", "scale8n", "diag32", "none", *V_TABLES, *V4_NAMES):
        raise SystemExit(
            f"probe: root3 (3-bit roots), rootcorr (roots in correlation form), refine3 (the factor's residual code "
            f"in 3 bits), scale8 / scale8n (8-bit log block scales, rounded up / to nearest), diag32 (exact root "
            f"diagonals), "
            f"{', '.join(V_TABLES)} (3-bit v), {', '.join(V4_NAMES)} (4-bit v, log-spaced) or none "
            "(today's codes)"
        )
    if which == "refine3":
        patch_refine3()
    if which in ("scale8", "scale8n"):
        patch_scale8(up=which == "scale8")
    if which == "diag32":
        patch_diag32()
    if which == "root3":
        patch()
    if which == "rootcorr":
        patch_root_correlation()
    if which in V_TABLES or which in V4_NAMES:
        patch_v(which)


def main() -> None:
    which, module, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    apply(which)
    print(f"{which}: running {module} {' '.join(rest)}", flush=True)
    raise SystemExit(importlib.import_module(module).main(rest))


if __name__ == "__main__":
    main()
