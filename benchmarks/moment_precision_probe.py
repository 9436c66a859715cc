"""Issue 14: which 4-bit moment loses the early first root's gain on the hard-conditioning family?

Runs the all-4-bit default form (``cholesky_ef``) on two least-squares problems of ``hard_conditioning.py`` (its
5-point lr grid, 200 steps, the ``"auto"`` schedule) with the early first root (``first_root_step="auto"``) and
without it (0), keeping one of the two Adam moments in fp32 by routing its encoder to the fp32 path:

    python benchmarks/moment_precision_probe.py m32    # m fp32, v 4-bit
    python benchmarks/moment_precision_probe.py v32    # v fp32, m 4-bit
    python benchmarks/moment_precision_probe.py none   # both 4-bit (the default)
    python benchmarks/moment_precision_probe.py none --beta2 0.99 --reference   # Adam's beta2, and the fp32 form
    python benchmarks/moment_precision_probe.py m32 --root_bits 8   # the same with the two-code roots
    python benchmarks/moment_precision_probe.py m8 --root_bits 8    # m through two 4-bit codes (~8 bit)

A probe, not an option: the patch swaps ``moments.encode_signed`` / ``encode_nonneg`` for the whole process.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hard_conditioning as hc  # noqa: E402

from hf_q4shampoo import moments  # noqa: E402
from hf_q4shampoo.quant import roundtrip_blockwise  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "which",
        choices=("m32", "v32", "m8", "none"),
        help="the moment kept in fp32 (none: both 4-bit; m8: m through two 4-bit codes, the second of the residual)",
    )
    ap.add_argument("--beta2", type=float, default=0.999, help="Adam's beta2 of every run")
    ap.add_argument("--reference", action="store_true", help="also the all-fp32 reference (precond=fp32, 32-bit)")
    ap.add_argument("--root_bits", type=int, default=4, help="root_bits of the cholesky_ef runs (4 or 8)")
    args = ap.parse_args(argv)
    orig_s, orig_n = moments.encode_signed, moments.encode_nonneg
    if args.which == "m32":
        moments.encode_signed = lambda x, quantized, m_map="dynamic": orig_s(x, False, m_map)  # noqa: E731
    if args.which == "m8":  # m stored as two 4-bit codes (simulated: the value the two codes decode to, in fp32)

        def two_codes(x, quantized, m_map="dynamic"):
            if not quantized:
                return orig_s(x, False, m_map)
            flat = x.reshape(x.shape[0], -1)
            first = roundtrip_blockwise(flat, m_map, moments.SIGNED_BLOCK)
            second = roundtrip_blockwise(flat - first, m_map, moments.SIGNED_BLOCK)
            return orig_s((first + second).reshape(x.shape), False, m_map)

        moments.encode_signed = two_codes
    if args.which == "v32":
        moments.encode_nonneg = lambda x, quantized: orig_n(x, False)  # noqa: E731
    forms = [("cholesky_ef", 4)] + ([("fp32", 32)] if args.reference else [])
    for prob in ("ls_k1e4_128x128", "ls_k1e6_256x128"):
        problem = hc.Problem(prob)
        for fr in ("auto", 0):
            for precond, bits in forms:
                spec = {"precond": precond, "first_order_bits": bits, "total_steps": 200, "first_root_step": fr}
                spec["betas"] = (0.9, args.beta2)
                if precond == "cholesky_ef":
                    spec["root_bits"] = args.root_bits
                res = hc.grid(problem, spec, hc.LS_LRS, 200)
                print(
                    args.which,
                    args.beta2,
                    prob,
                    f"{precond}/{bits}",
                    "first_root_step",
                    fr,
                    "best",
                    res.get("loss"),
                    res.get("best_lr"),
                    flush=True,
                )


if __name__ == "__main__":
    main()
