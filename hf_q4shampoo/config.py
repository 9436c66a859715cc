"""Every hyper-parameter of Q4Shampoo in one frozen, validated dataclass.

Where paper 1 (Cholesky + error feedback) is silent, the defaults follow paper 2's code and
appendix G (papers.md §1.3, §2.7, §2.8); each such open choice is a named field whose docstring
says which decision it encodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .blocking import SPLITS
from .options import ConfigError, OptionsBase, parse_bool, parse_key_values

__all__ = [
    "Q4ShampooConfig",
    "parse_optim_args",
    "auto_schedule",
    "auto_first_root",
    "allowed_values",
    "ConfigError",
    "GROUP_KEYS",
    "STATE_LAYOUT_KEYS",
    "SHAPE_DECIDED_KEYS",
    "LEGACY_STATE_LAYOUT",
]

PRECOND_FORMS = ("cholesky_ef", "cholesky", "eigen", "naive", "fp32")
ROOT_METHODS = ("auto", "eigh", "newton")
QUANT_MAPS = ("linear2", "dynamic")
FACTOR_SCALINGS = ("column", "row")
FACTOR_UPPERS = ("refine", "feedback")
GRAFTINGS = ("norm", "adam", "adam_filtered")

#: Hyper-parameters that may differ between parameter groups (torch's ``defaults`` convention).
GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "maximize")

#: Field metadata flag: the option decides how the saved state is laid out or decoded (see
#: ``STATE_LAYOUT_KEYS``, derived from it below the class).
_STATE = {"state": True}


def _state_field(default: Any) -> Any:
    """A config field that decides how saved state is read: a checkpoint made with another value is refused."""
    return field(default=default, metadata=_STATE)


#: The value a checkpoint implies for a layout field it does not record (it was saved before the field
#: existed, when the layout was this one): compared like a saved value, so an old checkpoint is refused
#: (naming the fields) instead of being decoded with another layout.
LEGACY_STATE_LAYOUT = {
    "first_order_v": "rank1",
    "first_order_m_map": "dynamic",
    "first_order_m_block": 128,
    "factor_scaling": "row",
    "factor_upper": "feedback",
    "grafting": "norm",
    "block_split": "fixed",
}


@dataclass(frozen=True)
class Q4ShampooConfig(OptionsBase):
    """Hyper-parameters of :class:`~hf_q4shampoo.Q4Shampoo`.

    First-order step (per parameter group):
        lr, betas, eps, weight_decay: AdamW's (``first_order="adamw"``; decoupled decay).
        momentum, nesterov: SGD's (``first_order="sgd"``; L2 decay added after grafting, paper 2).
            Nesterov needs a momentum above 0, as in ``torch.optim.SGD``.
        maximize: ascend instead of descend (torch's convention: the step uses ``-grad``). The
            statistics are unchanged (``G G^T`` does not depend on the sign).
        first_order: ``"adamw"`` (default) or ``"sgd"``.
        first_order_bits: 4 (paper 3: m block-128 dynamic exponent, v rank-1 zero-free linear;
            tensors of at most ``first_order_min_quant_numel`` entries stay fp32) or 32.
        first_order_min_quant_numel: tensors with at most this many entries keep fp32 moments when
            ``first_order_bits=4`` (paper 3 App. D.1: 4096, the default; tests lower it to exercise the
            4-bit moments on small tensors).
        first_order_v: Adam's second moment of matrices: ``"one_sided"`` (default: factored for the matrices
            Shampoo preconditions on one side only, ``max_aspect_ratio``: embeddings, LM heads, adapters;
            ``"rank1"`` elsewhere), ``"rank1"`` (as ``first_order_bits`` says) or ``"factored"`` (paper 3's
            "4-bit Factor": fp32 row and column means of ``g^2``, Adafactor's factorisation, for tensors of more
            than 4096 entries with two dims > 1 after flattening the trailing ones; about 0.5 byte per
            parameter less at 4 bits). GPT-2 small: 2.21 / 2.06 / 1.71 bytes/param for rank1 / one_sided /
            factored; factored everywhere ended the GPU LM task 0.03-0.085 higher in loss, one_sided no worse
            (docs/results.md §4.5).
        first_order_m_map: 4-bit code of the signed moments (Adam's m, SGD's momentum): ``"linear2"``
            (paper 2's Linear-2, default) or ``"dynamic"`` (paper 3's dynamic exponent, which has no -1, so a
            block whose largest entry is negative loses 11% of it at every re-encoding). docs/results.md §4.
        first_order_m_block: entries per block (one absmax scale) of the 4-bit signed moments: 128 (paper 3), 256
            (default), 512 or 1024. 256 halves m's scales (GPT-2 small 2.003 -> 1.999 bytes/param, the last lever
            of issue 14's 2.0 target) at no measured cost (docs/results.md §4.9).
        grafting: how a preconditioned matrix's direction gets its size (Shampoo's roots set only its shape):
            ``"norm"`` (default): per tensor, ``G~ = G^ ||G||_F / ||G^||_F``, then the AdamW (or SGD) step runs on
            ``G~`` (its m and v are moments of ``G~``). ``"adam"`` (Distributed Shampoo's Adam grafting): per
            block, ``G~ = G^ ||A||_F / ||G^||_F`` with ``A = G / (sqrt(v / (1 - beta2^t)) + eps)`` the Adam step
            of the raw gradient (``v <- beta2 v + (1 - beta2) G^2``, stored as ``first_order_bits`` /
            ``first_order_v`` say); then ``m <- beta1 m + (1 - beta1) G~`` and
            ``W <- (1 - lr wd) W - lr m / (1 - beta1^t)``. Before a matrix's first root its direction is ``A``
            itself. Same state keys and bytes as AdamW (``exp_avg`` holds m of ``G~``, ``exp_avg_sq`` v of ``G``),
            other meaning: a state field. Needs ``first_order="adamw"`` (SGD has no second moment to graft
            to). Parameters without a preconditioner take plain AdamW either way.
            ``"adam_filtered"`` (Distributed Shampoo's algorithm as it runs with Adam grafting and beta1 > 0:
            the momentum is taken first and Shampoo preconditions it): ``m <- beta1 m + (1 - beta1) G``,
            ``M = m / (1 - beta1^t)``, ``v`` as for ``"adam"``; per block ``D = M^ ||A||_F / ||M^||_F`` with
            ``M^ = L^ M R^`` and ``A = M / (sqrt(v / (1 - beta2^t)) + eps)`` (the AdamW step itself, which is
            ``D`` before the first root); ``W <- (1 - lr wd) W - lr D``. The step's size per block is exactly
            AdamW's, its direction Shampoo's; m and v are moments of the raw gradient (a state field, as
            ``"adam"``; needs ``first_order="adamw"``). On the CPU byte-level LM task of
            ``benchmarks/quality_cpu.py`` it removes the slow early descent of ``"norm"`` on some seeds, but
            with 4-bit moments it loses badly on ill-conditioned problems: the quantized momentum is
            preconditioned afterwards (docs/results.md §4.3b).

    Shampoo schedule (paper 2 Algorithm 4):
        update_freq: T1. The statistics are updated on steps t with t % T1 == 0, from that step's
            gradient only (the gradients in between are not accumulated, as in paper 2).
        root_freq: T2. Inverse roots are recomputed on steps t with t % T2 == 0; before the first
            one the roots are the identity and the step is a plain first-order step.
            Both default to ``"auto"``: derived from ``total_steps`` by :func:`auto_schedule` (a tenth of
            the run between roots, clamped to [10, 500], statistics ten times as often), or 10 / 100 when
            the run's length is unknown. Paper 2's 100 / 500 suits runs of 10^4-10^5 steps; in a run of a
            few thousand steps it computes its first root late or never.
        total_steps: the run's length in optimizer steps, if known (the Trainer integration fills it
            from ``max_steps``); only the ``"auto"`` schedule reads it.
        start_precond_step: no statistics or roots before this step.
        first_root_step: ``"auto"`` (default), 0, or a step before ``root_freq`` at which every matrix gets an
            extra, early first inverse root (at this step plus its root offset, spread as the later ones), so that
            a run is preconditioned from near its start instead of from ``root_freq`` on; later roots keep the
            ``root_freq`` grid. 0: the first root at ``root_freq`` (paper 2). ``"auto"``: ``max(2 update_freq,
            root_freq // 5)`` when that is before ``root_freq``, else 0 (:func:`auto_first_root`). A value should
            leave every factor a statistics update before it (at least ``update_freq + refresh_spread``).
        refresh_spread: spread the refreshes over this many consecutive steps, so no single step pays
            for every statistics update and root: each matrix gets a statistics offset in
            [0, min(refresh_spread, update_freq)) (narrowed by ``statistics_spread``) and a root offset in
            [0, min(refresh_spread, root_freq)),
            each chosen to balance the work (sum of K n^3 per offset) over runs of consecutive same-shape
            matrices (so a step refreshes whole stacks in one batched call), and is refreshed on steps t with
            (t - offset) a positive multiple of the frequency. 1 gives paper 2's schedule exactly. The
            offsets are saved with the state. Each factor is still refreshed every update_freq / root_freq
            steps; only its first refresh may come up to ``spread - 1`` steps later than in the paper's
            schedule. When ``update_freq`` divides ``root_freq`` and both spreads fit in ``update_freq`` steps
            (e.g. 100 / 100), the roots take the slots after the statistics' (no step carries both).
            Default 25: a full round of roots costs ~0.4 s on GPT-2 small on an H200, so a step
            carries ~16 ms of it; spreading wider leaves the GPU idle between small calls (100 made the
            round 3.7x as expensive, docs/perf_notes.md v7).
        statistics_spread: a narrower spread for the statistics alone: statistics offsets in
            [0, min(statistics_spread, refresh_spread, update_freq)) (so ``refresh_spread=1`` is still paper 2's
            schedule); 0: as ``refresh_spread``. Default 5: a statistics update of a few factors costs nearly
            as much GPU time as one of many (per-call work: the batched Cholesky, the element-wise passes), so
            fewer, larger calls save time, while a step's share of a statistics round stays far below a root
            round's. On GPT-2 small at 10 / 100 on one H200, 5 against 25 cut the statistics stage from 5.4 to 4.4
            ms per step and the optimizer step from 17.5 to 16.5 ms, worst step unchanged (41 against 40 ms;
            spreading the roots over 5 too made it 92 ms), docs/perf_notes.md v21.
        stat_decay: beta of ``L <- beta L + (1 - beta) G G^T`` (paper 2: 0.95).
        matrix_eps: relative ridge: roots are of ``L + matrix_eps * lambda_max * I``; the statistics
            start at ``matrix_eps * I`` (paper 2: 1e-6).

    Blocking (see ``blocking.py``):
        max_precond_dim: dimensions longer than this are cut into blocks (paper 2: 1200; we use
            1024, which suits GPU matrix units and Distributed Shampoo's default).
        block_split: how: ``"fixed"`` (default, Distributed Shampoo's: blocks of exactly ``max_precond_dim``
            and a remainder; GPT-2's 2304 -> 2 x 1024 + 256) or ``"even"`` (the fewest blocks of at most
            ``max_precond_dim``, equal to within one; 2304 -> 3 x 768: 1.4% less state and 0.9 ms less optimizer
            time per step on GPT-2 small, but 0.010-0.036 higher final loss on the GPU LM task in three of three
            seeds, docs/results.md §4.5).
        max_aspect_ratio: a dimension more than this many times longer than the other is not
            preconditioned (only the short side is); 0 disables the rule. Otherwise at least 1 (below 1
            even a square matrix would lose a factor).
        min_precond_numel: matrices with fewer entries bypass Shampoo.

    Storage:
        precond: ``"cholesky_ef"`` (paper 1's layout, default: 4-bit Cholesky factor in the lower triangle of
            a code buffer whose upper triangle holds, by ``factor_upper``, the error-feedback state or a
            second code of the factor), ``"cholesky"`` (the factor alone), ``"eigen"`` (paper 2), ``"naive"``
            (4-bit statistics, paper 2's baseline / paper 1's VQ) or ``"fp32"`` (32-bit Shampoo reference).
        min_quant_numel: factors with fewer entries stay fp32 (paper 2: 4096, i.e. order < 64).
        quant_map: 4-bit code of preconditioners: ``"linear2"`` (paper 2 default) or ``"dynamic"``.
        quant_block_size: entries per absmax block inside a row (paper 2: 64); at most 4096 (a block
            never spans rows, and longer rows than that are cut into blocks by ``max_precond_dim`` anyway).
            128 would save 4 MiB (0.03 byte/param) on GPT-2 small with bf16 scales but cost 3.7% on the
            teacher-student task and 3-6% on the hard-conditioning family (docs/results.md §4.5). Block scales take
            one byte each (a log2 grid relative to one exponent per matrix: ``log_scales``).
        root_bits: 4 (fp16 diagonal over an fp32 scale + 4-bit off-diagonal, paper 2's DiagReal; decision D4), 8
            (the same plus a second 4-bit code of the first one's residual: about 8-bit roots, twice the root codes:
            GPT-2 small 2.00 -> 2.38 bytes/param; since its two codes are decoded in one launch, training time on the
            time-to-target task as the default's, 46.5 s against 46.8 s, docs/perf_notes.md v25) or 32. With the early
            first root the 4-bit roots are what loses most on the hard-conditioning family, and 8 recovers nearly
            all of fp32 roots' gain there (docs/results.md §4.7); the default stays 4 for memory and speed.
        root_method: ``"eigh"`` (fp32 eigendecomposition, fp64 retry), ``"newton"`` (coupled Newton /
            Schur-Newton of paper 2) or ``"auto"`` (eigh on CPU, newton on accelerators, where batched
            matrix products are far faster than eigendecompositions).
        newton_max_iters, newton_tol: limits of the Newton iteration (paper 2: tol 1e-6).

    Paper 1 choices it leaves open (papers.md §2.8), each a decision of ours:
        ef_beta: beta_e of the error-feedback EMA ``E <- beta_e E + (1 - beta_e) residual``.
            No value is published; see docs/results.md for the ablation behind the default.
        cholesky_eps: ridge inside the Cholesky factorisation, relative to the largest diagonal entry
            of the statistics (D5); failed factorisations are retried with 100x and 10^4x the ridge
            and finally fall back to the diagonal factor (``linalg.robust_cholesky``).
        remove_cholesky_ridge: subtract that ridge again when the statistics are rebuilt from the
            stored factor (D3); otherwise it compounds to ~ridge / (1 - beta) over time.

    Storage of the Cholesky factor (ours; measured in docs/results.md §4):
        factor_scaling: ``"column"`` (default) divides each column of the factor by its diagonal entry
            before quantizing (the unit-diagonal factor of LDL^T); ``"row"`` quantizes the factor's
            off-diagonal as it is (paper 1, as far as known).
        factor_upper: what the otherwise unused upper triangle of ``cholesky_ef``'s code buffer holds:
            ``"refine"`` (default: a second 4-bit code of the first code's residual, so the factor is kept
            to ~8 bits in the same bytes, with no error feedback) or ``"feedback"`` (paper 1's error-feedback
            state). Every 4-bit re-encoding inflates the statistics along the eigenvectors of their small
            eigenvalues (a second-order error that error feedback cannot cancel); refining shrinks it ~10x.

    Paper 2 (``precond="eigen"``):
        bjorck_update_iters, bjorck_root_iters: Björck rectification steps before a statistics update
            and before a root (paper 2: 1 and 4).

    Options marked as *state* fields (``STATE_LAYOUT_KEYS``: precond, first_order, first_order_bits,
    first_order_min_quant_numel, first_order_v, first_order_m_map, first_order_m_block, grafting, max_precond_dim,
    block_split, max_aspect_ratio, min_precond_numel, min_quant_numel, quant_map, quant_block_size, root_bits,
    factor_scaling, factor_upper) decide how the saved state is laid out and decoded; ``Q4Shampoo.load_state_dict``
    refuses a checkpoint made with other values of any of them, except where another value of ``first_order_v`` or
    ``block_split`` leaves every parameter's state as it was (``SHAPE_DECIDED_KEYS``).

    Several GPUs (no effect on the math):
        shard_preconditioners: under DDP (``torch.distributed`` initialised with more than one rank and parameters
            that are plain tensors, not FSDP2's DTensors), split the preconditioner work and memory among the
            ranks: each matrix has one owner rank that keeps its statistics and error feedback and computes its
            roots, and the owners all-gather the refreshed 4-bit roots (``distributed.py``). Every rank applies
            every root and keeps the first-order moments, so the result equals the single-process algorithm on
            the same (all-reduced) gradients, bitwise on every replica. False: every rank keeps and computes
            everything (no optimizer communication). Ignored in a single process and under FSDP2.
        shard_parameters: with ``shard_preconditioners`` under DDP, split the whole step instead: each owner
            rank updates its parameters completely (statistics, roots, ``L^ G R^``, grafting, first-order moments:
            all their state lives on the owner alone; every trainable parameter has an owner, chosen by modelled
            per-step cost) and one in-place all-gather sends the updated parameters to every rank after every
            step (4 bytes per fp32 parameter x (N-1)/N per step; ZeRO-1's and Distributed Shampoo's way). For that,
            at the first step, the parameters' ``.data`` move into one flat buffer laid out by owner (the Parameter
            objects stay the same). Replicas stay bitwise equal. Off by default: on two H200s it was as fast as the
            preconditioner split (0.835x vs 0.832x one GPU's optimizer time) with half the state per rank
            (docs/perf_notes.md v20).

    Speed (no effect on the math):
        use_compile: fuse the first-order step's elementwise work with ``torch.compile`` on accelerators
            (never on CPU). The first steps then pay a one-off compilation (about two per code path).
        cuda_graph: on CUDA, capture a step's update (``L^ G R^``, grafting, the first-order step: ~600 kernels) as one
            CUDA graph and replay it in the steps that look the same, instead of launching its kernels from the host
            each time; the statistics updates due in a step run before it as graphs of their own, one per refresh slot
            (captured at the slot's second sighting, ``step_graph.KeyedGraphs``), the root refreshes eagerly, and the
            gradients are read through a table of their addresses, so ``zero_grad(set_to_none=True)`` is fine
            (``step_graph.py``, ``graphed_update.py``, ``refresh.py``). It applies where the first-order update reads
            the learning rate from the device (AdamW with ``use_compile``: the Triton 4-bit kernels or torch's fused
            AdamW), ``grafting="norm"``, one learning rate and one step count for all parameters, and no DDP work split;
            other steps run eagerly. The graphs' pools keep their transients between steps (shape groups are taken in
            chunks to bound the update's; about 1 GB in all on a 92M-parameter GPT-2, perf_notes v26). ``"auto"``
            (default) tries it: the time between ``step()`` calls on the GPU's timeline over 15 eager steps (after the
            first 5) against 15 replayed ones; the graph is kept if it is 3% faster, else dropped with its pool
            (``step_graph.GraphTrial``).
            "auto" does not try it under FSDP2 (DTensor parameters, untested there) nor where it never applies.
            True: always where it applies; False: every step eager. Measured on one H200, 2026-11-30
            (docs/perf_notes.md v17b and v18, with the commands): pool 120-194 MiB; where the host is the bound
            (a 91.7M model) the mean step -8-16%; where the GPU is the bound (GPT-2 small) +2-5%.
        apply_dtype: dtype of the per-step products ``L^ G R^``: ``"float32"``, ``"bfloat16"`` or
            ``"auto"`` (bf16 on accelerators, fp32 on CPU). bf16 changes the preconditioned direction by
            ~0.4% (measured, tests/test_optimizer.py), far below the 4-bit roots' own error (~10%);
            statistics, roots and the first-order step stay fp32.
        gram_precision: precision of the Gram products that build the statistics (``G G^T``, ``G^T G`` and,
            for the Cholesky forms, ``C C^T``) on CUDA: ``"float32"`` (IEEE), ``"tf32"`` or ``"auto"`` (TF32
            for the 4-bit forms, IEEE for ``precond="fp32"``). A TF32 product is the exact Gram matrix of
            inputs rounded to 10 mantissa bits (relative 2^-11 per entry, still PSD): ~6x faster on an H200
            and far below the 4-bit storage's own error (docs/perf_notes.md v6). Inverse roots always run in
            IEEE fp32, whatever the process-wide TF32 setting.
        fused_statistics: on CUDA, run the Cholesky forms' (de)quantization of the factor in three Triton kernels
            (one pass to dequantize, two to re-quantize) instead of ~30-45 element-wise torch operations, for every
            factor layout (``factor_scaling`` "row" or "column"; ``factor_upper`` "feedback" or "refine";
            ``precond`` "cholesky_ef" or "cholesky"). The result is meant to be the torch path's bit for bit (the
            kernels divide in IEEE and do not contract multiply-adds, as torch's separate kernels do not):
            checked in Triton's interpreter (tests/test_triton_interpret.py) and, for all six layouts, bit for bit on
            an H200 (tests/test_cuda.py). On by default (a no-op without CUDA and Triton): on GPT-2 small, H200, it
            cuts a statistics round of the default layout from ~60 to ~40 ms (mean step at ``update_freq=1``
            2.19x -> 1.87x fused AdamW, at 10: 1.34x -> 1.26x; docs/perf_notes.md v12). ``False`` runs the torch
            code (the oracle). No effect on CPU, on other forms,
            and on factors small enough to stay fp32 (``min_quant_numel``).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    maximize: bool = False
    first_order: str = _state_field("adamw")
    first_order_bits: int = _state_field(4)
    first_order_min_quant_numel: int = _state_field(4096)
    first_order_v: str = _state_field("one_sided")
    first_order_m_map: str = _state_field("linear2")
    first_order_m_block: int = _state_field(256)
    grafting: str = _state_field("norm")
    precond: str = _state_field("cholesky_ef")
    update_freq: int | str = "auto"
    root_freq: int | str = "auto"
    total_steps: int | None = None
    start_precond_step: int = 1
    first_root_step: int | str = "auto"
    stat_decay: float = 0.95
    matrix_eps: float = 1e-6
    max_precond_dim: int = _state_field(1024)
    block_split: str = _state_field("fixed")
    max_aspect_ratio: float = _state_field(16.0)
    min_precond_numel: int = _state_field(64)
    min_quant_numel: int = _state_field(4096)
    quant_map: str = _state_field("linear2")
    quant_block_size: int = _state_field(64)
    root_bits: int = _state_field(4)
    root_method: str = "auto"
    newton_max_iters: int = 25
    newton_tol: float = 1e-6
    ef_beta: float = 0.0
    cholesky_eps: float = 1e-6
    remove_cholesky_ridge: bool = True
    factor_scaling: str = _state_field("column")
    factor_upper: str = _state_field("refine")
    bjorck_update_iters: int = 1
    bjorck_root_iters: int = 4
    use_compile: bool = True
    apply_dtype: str = "auto"
    gram_precision: str = "auto"
    fused_statistics: bool = True
    refresh_spread: int = 25
    statistics_spread: int = 5
    shard_preconditioners: bool = True
    shard_parameters: bool = False
    cuda_graph: bool | str = "auto"

    def __post_init__(self) -> None:
        self._normalise_and_validate(_validate)
        if self.grafting != "norm" and self.first_order != "adamw":
            raise ConfigError(
                f"Q4Shampoo: grafting={self.grafting!r} needs first_order='adamw' (got first_order="
                f"{self.first_order!r}): it rescales Shampoo's direction to the norm of the Adam step, from Adam's "
                "first and second moments. With first_order='sgd' use grafting='norm'."
            )
        if self.first_order == "sgd" and self.nesterov and self.momentum == 0:
            raise ConfigError(
                "Q4Shampoo: nesterov=True needs momentum > 0 with first_order='sgd' (as torch.optim.SGD); "
                "got momentum=0. Set momentum in (0, 1) or nesterov=False."
            )

    def group_defaults(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in GROUP_KEYS}

    def schedule(self) -> tuple[int, int]:
        """``(update_freq, root_freq)`` with ``"auto"`` resolved (see :func:`auto_schedule`)."""
        auto_update, auto_root = auto_schedule(self.total_steps)
        root = auto_root if self.root_freq == "auto" else self.root_freq
        if self.update_freq != "auto":
            update = self.update_freq
        else:
            update = auto_update if self.root_freq == "auto" else max(1, root // 10)
        return update, root

    def first_root(self) -> int:
        """``first_root_step`` with ``"auto"`` resolved (see :func:`auto_first_root`); 0: no early root."""
        if self.first_root_step != "auto":
            return self.first_root_step
        return auto_first_root(*self.schedule())


#: Fields that decide the layout and decoding of the saved state (flagged ``_state_field`` above); a
#: checkpoint made with other values of these cannot be loaded (the error names the differing fields).
STATE_LAYOUT_KEYS = tuple(f.name for f in fields(Q4ShampooConfig) if f.metadata.get("state"))

#: Layout options whose other values change only the keys or shapes of some parameters' state, never what a
#: state of the same keys and shapes means: a checkpoint made with another value loads where every parameter's
#: saved state fits (``checkpoint.py``), e.g. a ``"rank1"`` checkpoint of a model without one-sided matrices
#: under ``first_order_v="one_sided"``, or a ``"fixed"`` one whose preconditioned dimensions are all multiples
#: of ``max_precond_dim`` (or shorter) under ``block_split="even"``: the same blocks.
SHAPE_DECIDED_KEYS = ("first_order_v", "block_split")


#: (update_freq, root_freq) of the "auto" schedule when the run's length is unknown.
UNKNOWN_LENGTH_SCHEDULE = (10, 100)


def auto_schedule(total_steps: int | None) -> tuple[int, int]:
    """The ``"auto"`` ``(update_freq, root_freq)`` for a run of ``total_steps`` optimizer steps.

    Roots every tenth of the run (so the run has about ten preconditioned stretches, the first after 10% of
    it), clamped to [10, 500]: 500 is paper 2's value for long runs, 10 keeps a root refresh (the costliest
    stage) from running more often than about every 10 steps. Statistics ten times as often as roots, as in
    paper 2 (100 / 500 there is 5x; a shorter run gets fewer roots, so each should see more updates).
    Unknown length: 10 / 100, the schedule measured in docs/results.md for runs of ~10^3 steps.
    """
    if total_steps is None:
        return UNKNOWN_LENGTH_SCHEDULE
    root = min(500, max(10, round(total_steps / 10)))
    return max(1, root // 10), root


def auto_first_root(update_freq: int, root_freq: int) -> int:
    """The ``"auto"`` ``first_root_step``: ``max(2 update_freq, root_freq // 5)``, or 0 (none) when that is not
    before ``root_freq``. Two statistics periods, so that every factor (statistics offsets lie in one period)
    has been updated at least once before its early root, and a fifth of the root period at least. Measured on
    the time-to-target model (8/80, docs/perf_notes.md v18): AdamW's final loss at step 461 instead of 492."""
    early = max(2 * update_freq, root_freq // 5)
    return early if early < root_freq else 0


# --------------------------------------------------------------------------------------------
# Validation rules: (kind, constraint, human description)
# --------------------------------------------------------------------------------------------

_CHOICES: dict[str, tuple] = {
    "first_order": ("adamw", "sgd"),
    "first_order_v": ("rank1", "factored", "one_sided"),
    "block_split": SPLITS,
    "first_order_m_map": ("linear2", "dynamic"),
    "first_order_m_block": (128, 256, 512, 1024),
    "grafting": GRAFTINGS,
    "precond": PRECOND_FORMS,
    "root_method": ROOT_METHODS,
    "quant_map": QUANT_MAPS,
    "factor_scaling": FACTOR_SCALINGS,
    "factor_upper": FACTOR_UPPERS,
    "apply_dtype": ("auto", "float32", "bfloat16"),
    "gram_precision": ("auto", "float32", "tf32"),
    "first_order_bits": (4, 32),
    "root_bits": (4, 8, 32),
}
_AUTO_INT = ("update_freq", "root_freq")  # a positive integer or "auto"
_AUTO_STEP = ("first_root_step",)  # an integer >= 0 or "auto"
_AUTO_BOOL = ("cuda_graph",)  # true, false or "auto"
_INT_MIN = {
    "start_precond_step": 0,
    "max_precond_dim": 1,
    "min_precond_numel": 0,
    "min_quant_numel": 0,
    "first_order_min_quant_numel": 0,
    "quant_block_size": 2,
    "newton_max_iters": 1,
    "bjorck_update_iters": 0,
    "bjorck_root_iters": 0,
    "refresh_spread": 1,
    "statistics_spread": 0,
}
_INT_MAX = {"quant_block_size": 4096}  # larger blocks only waste memory (a block lies inside one row)
# (low, high, low inclusive, high inclusive)
_FLOAT_RANGE = {
    "lr": (0.0, float("inf"), True, False),
    "eps": (0.0, float("inf"), True, False),
    "weight_decay": (0.0, float("inf"), True, False),
    "momentum": (0.0, 1.0, True, False),
    "stat_decay": (0.0, 1.0, True, False),
    "matrix_eps": (0.0, float("inf"), False, False),
    "max_aspect_ratio": (0.0, float("inf"), True, False),
    "newton_tol": (0.0, float("inf"), False, False),
    "ef_beta": (0.0, 1.0, True, False),
    "cholesky_eps": (0.0, float("inf"), False, False),
}
_BOOLS = (
    "nesterov",
    "maximize",
    "remove_cholesky_ridge",
    "use_compile",
    "fused_statistics",
    "shard_preconditioners",
    "shard_parameters",
)


def _range_text(low: float, high: float, lo_inc: bool, hi_inc: bool) -> str:
    left = "[" if lo_inc else "("
    right = "]" if hi_inc else ")"
    return f"{left}{low:g}, {high:g}{right}"


def allowed_values(name: str) -> str:
    """What ``name`` accepts, in words (used by every error message about its value)."""
    if name in _AUTO_INT:
        return '"auto" or an integer >= 1'
    if name in _AUTO_STEP:
        return '"auto" or an integer >= 0'
    if name in _AUTO_BOOL:
        return 'true, false or "auto"'
    if name == "total_steps":
        return "None (unknown) or an integer >= 1"
    if name in _CHOICES:
        return "one of " + ", ".join(map(repr, _CHOICES[name]))
    if name in _INT_MAX:
        return f"an integer in [{_INT_MIN[name]}, {_INT_MAX[name]}]"
    if name in _INT_MIN:
        return f"an integer >= {_INT_MIN[name]}"
    if name == "max_aspect_ratio":
        return "0 (no limit) or a number >= 1"
    if name in _FLOAT_RANGE:
        return f"a number in {_range_text(*_FLOAT_RANGE[name])}"
    if name in _BOOLS:
        return "true or false"
    if name == "betas":
        return "two numbers in [0, 1) (b1:b2 in optim_args)"
    raise AssertionError(f"no validation rule for {name}")  # pragma: no cover - every field must have a rule


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(name: str, value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    v = float(value)
    if name == "max_aspect_ratio" and v == 0.0:
        return True
    low, high, lo_inc, hi_inc = _FLOAT_RANGE[name]
    if name == "max_aspect_ratio":
        low = 1.0
    return (v >= low if lo_inc else v > low) and (v <= high if hi_inc else v < high)


def _valid(name: str, value: Any) -> bool:
    if name in _AUTO_INT:
        return value == "auto" or (_is_int(value) and value >= 1)
    if name in _AUTO_STEP:
        return value == "auto" or (_is_int(value) and value >= 0)
    if name in _AUTO_BOOL:
        return value == "auto" or isinstance(value, bool)
    if name == "total_steps":
        return value is None or (_is_int(value) and value >= 1)
    if name in _CHOICES:
        return not isinstance(value, bool) and value in _CHOICES[name]
    if name in _INT_MIN:
        return _is_int(value) and _INT_MIN[name] <= value <= _INT_MAX.get(name, value)
    if name in _FLOAT_RANGE:
        return _in_range(name, value)
    if name in _BOOLS:
        return isinstance(value, bool)
    if name == "betas":
        return (
            isinstance(value, tuple)
            and len(value) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in value)
        )
    raise AssertionError(f"no validation rule for {name}")  # pragma: no cover - every field must have a rule


def _validate(name: str, value: Any) -> None:
    if _valid(name, value):
        return
    if name in _CHOICES:
        raise ConfigError(
            f"Q4Shampoo: {name}={value!r} is not valid; allowed values: {', '.join(map(repr, _CHOICES[name]))}."
        )
    raise ConfigError(f"Q4Shampoo: {name} must be {allowed_values(name)}, got {value!r}.")


# --------------------------------------------------------------------------------------------
# ``--optim_args`` parsing
# --------------------------------------------------------------------------------------------


def _cast(name: str, text: str) -> Any:
    default = getattr(Q4ShampooConfig, name)
    if name in _AUTO_INT + _AUTO_STEP + _AUTO_BOOL and text.strip().lower() == "auto":
        return "auto"
    if name in _AUTO_INT + _AUTO_STEP or name == "total_steps":
        default = 0  # an integer field whose default is not an int
    if name in _BOOLS + _AUTO_BOOL:
        return parse_bool(name, text, "Q4Shampoo")
    try:
        if name in _CHOICES and isinstance(_CHOICES[name][0], str):
            return text.lower()
        if isinstance(default, bool):  # pragma: no cover - covered by _BOOLS
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if name == "betas":
            parts = text.replace(";", ":").split(":")
            return tuple(float(p) for p in parts)
    except ValueError:
        pass
    else:
        return text
    if name == "betas":
        expected = "two numbers written as b1:b2"
    else:
        expected = "an integer" if isinstance(default, int) else "a number"
    raise ConfigError(
        f"Q4Shampoo: optim_args value {name}={text!r} is not {expected}; allowed: {allowed_values(name)}."
    )


def parse_optim_args(text: str | None, reserved: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse ``"key=value,key=value"`` (``--optim_args``) into typed Q4Shampoo options.

    Keys are :class:`Q4ShampooConfig` field names. Values are cast to the field's type and
    validated. ``reserved`` maps keys that must not be given here to the place they come from
    (e.g. ``{"lr": "--learning_rate"}``); giving one raises :class:`ConfigError` naming it.
    """
    out = parse_key_values(
        text, "Q4Shampoo", Q4ShampooConfig.field_names(), "update_freq=10", _cast, _validate, reserved
    )
    if out:
        _check_combination(out)
    return out


def _check_combination(options: dict[str, Any]) -> None:
    """Cross-field rules of :class:`Q4ShampooConfig` for options given together (e.g. nesterov without momentum)."""
    try:
        Q4ShampooConfig(**options)
    except ConfigError as err:
        raise ConfigError(f"{str(err).rstrip('.')} (from optim_args).") from None
