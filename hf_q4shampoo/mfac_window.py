"""The compressed gradient window of :class:`~hf_q4shampoo.sparse_mfac.SparseMFAC` (EFCP, arXiv 2306.06098).

A window is the ring of the last ``m`` compressed gradients ``c_1 .. c_m`` of one parameter group (the
group's gradients flattened into one vector of length ``d``). Each window class does three things on
the tensors it keeps in the group's state dict:

``insert``   error feedback and compression of a new gradient into ring slot ``s``
             (``a = e + g``; ``c = compress(a)``; ``e = a - c``; ``c`` replaces slot ``s``), returning
             the new row of the inner-product matrix ``D = G G^T`` (``G c``, length ``m``);
``dots``     ``G x`` for any vector ``x`` of length ``d``;
``combine``  ``G^T b`` for coefficients ``b`` of length ``m``.

With those three, :func:`inverse_fisher_coefficients` gives M-FAC's inverse empirical Fisher products
from the m x m matrix ``D`` alone (its "dynamic algorithm": ``D`` changes by one row and column per
step). Slots not yet written hold zeros, so they add nothing to ``F`` before the ring is full.

Windows:

* :class:`TopKWindow` (``variant="topk"``): ``c`` = the ``k`` entries of ``a`` largest in magnitude,
  stored as fp32 values and int32 (int64 when ``d >= 2**31``) positions, ``m x k`` each; with
  ``dense=True`` the slot is an fp32 row of length ``d`` instead (the dense M-FAC baseline when
  ``k == d``, which also keeps no error accumulator: nothing is dropped). Inner products with stored rows
  gather ``x`` at the stored positions.
* :class:`LowRankWindow` (``variant="lowrank"``): each matrix parameter (``shape[0] x rest``) is
  compressed to ``P Q^T`` of rank ``r`` by one power iteration warm-started from the previous ``Q``
  (PowerSGD-style, as EFCP's low-rank compressor); vectors and matrices whose short side is ``<= r``
  are stored exactly. Inner products use the factors: ``<P Q^T, P' Q'^T> = sum((P^T P') * (Q^T Q'))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TopKWindow", "LowRankWindow", "Segment", "inverse_fisher_coefficients", "GATHER_CHUNK"]

#: Gathered entries per chunk in the sparse products: bounds their scratch memory (64 MiB of fp32)
#: whatever ``m * k`` is (a MiniLM-sized group at m = 1024 has ~2.3e8 stored entries).
GATHER_CHUNK = 2**24


def written_rows(state: dict, m: int) -> int:
    """Ring slots written so far: slot ``s`` holds step ``s + 1``'s gradient until the ring wraps."""
    return min(m, int(state["step"]))


def inverse_fisher_coefficients(dots: torch.Tensor, damp: float, rhs: torch.Tensor) -> torch.Tensor:
    """``(damp * m * I + D)^{-1} rhs`` in fp64, for ``F = damp * I + (1/m) G^T G`` with ``D = G G^T``.

    Woodbury gives ``F^{-1} x = (x - G^T (damp m I + D)^{-1} G x) / damp``; this solves the m x m system.
    fp64 because the system's condition number grows like ``||g||^2 / (damp m)``: at the paper's
    ``damp = 1e-7`` fp32 elimination (what M-FAC's LU does) would lose most digits; at m <= 1024 the
    fp64 solve is a few milliseconds. Pivoted LU rather than Cholesky: equally cheap, and it needs no
    host-side success check (no device synchronisation).
    """
    m = dots.shape[0]
    system = dots.clone()
    system.diagonal().add_(damp * m)
    return torch.linalg.solve(system, rhs.to(torch.float64))


# ------------------------------------------------------------------------------------------------
# top-k (and dense) window
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKWindow:
    """Ring of top-k sparsified gradients (``dense``: stored as full rows)."""

    m: int
    d: int
    k: int
    dense: bool = False

    @property
    def uncompressed(self) -> bool:
        """Dense rows at k == d: dense M-FAC, which drops nothing and so keeps no error accumulator."""
        return self.dense and self.k == self.d

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int32 if self.d < 2**31 else torch.int64

    def init_state(self, state: dict, device: torch.device) -> None:
        width = self.d if self.dense else self.k
        state["window_values"] = torch.zeros(self.m, width, dtype=torch.float32, device=device)
        if not self.dense:
            state["window_indices"] = torch.zeros(self.m, self.k, dtype=self.index_dtype, device=device)
        if not self.uncompressed:
            state["error"] = torch.zeros(self.d, dtype=torch.float32, device=device)

    def insert(self, state: dict, grad: torch.Tensor, slot: int, step: int) -> torch.Tensor:
        """Error feedback + top-k of ``grad`` into ``slot``; returns ``G c``. ``grad`` is used as scratch."""
        del step  # top-k needs no randomness
        values = state["window_values"]
        if self.uncompressed:  # dense M-FAC: c = g
            values[slot].copy_(grad)
            return self.dots(state, values[slot])
        acc = state["error"].add_(grad)  # a_t = e_{t-1} + g_t, in the error buffer
        picked = torch.topk(acc.abs(), self.k, sorted=False).indices
        kept = acc.index_select(0, picked)
        acc.index_fill_(0, picked, 0.0)  # e_t = a_t - c_t: exactly zero where c_t took the entry
        if self.dense:
            values[slot].zero_().index_copy_(0, picked, kept)
            return self.dots(state, values[slot])
        values[slot].copy_(kept)
        state["window_indices"][slot].copy_(picked)
        c_dense = grad.zero_().index_copy_(0, picked, kept)
        return self.dots(state, c_dense)

    def _chunks(self, state: dict):
        """The written rows in chunks of at most ``GATHER_CHUNK`` entries.

        Rows not written yet (the first ``m`` steps) are skipped: they add nothing, and their positions are all
        0, so scattering them sent every one of their k adds to one entry, serialised: on an H200, 406 ms of a
        415 ms step at m = 1024 after 25 steps (docs/sparse_mfac.md).
        """
        rows = max(1, GATHER_CHUNK // max(1, self.k))
        values, indices = state["window_values"], state["window_indices"]
        written = written_rows(state, self.m)
        for start in range(0, written, rows):
            end = min(start + rows, written)
            yield start, values[start:end], indices[start:end]

    def dots(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        """``G x`` (fp32, length m); sparse rows gather ``x`` at their stored positions."""
        if self.dense:
            return state["window_values"] @ x
        out = torch.zeros(self.m, dtype=torch.float32, device=x.device)
        for start, values, indices in self._chunks(state):
            gathered = x.index_select(0, indices.reshape(-1)).view_as(values)
            out[start : start + values.shape[0]] = torch.linalg.vecdot(gathered, values)
        return out

    def combine(self, state: dict, coef: torch.Tensor) -> torch.Tensor:
        """``G^T coef`` (fp32, length d): the stored rows scattered and summed with weights ``coef``."""
        if self.dense:
            return coef @ state["window_values"]
        out = torch.zeros(self.d, dtype=torch.float32, device=coef.device)
        for start, values, indices in self._chunks(state):
            weighted = values * coef[start : start + values.shape[0], None]
            out.index_add_(0, indices.reshape(-1), weighted.reshape(-1))
        return out

    def reconstruct(self, state: dict, slot: int) -> torch.Tensor:
        """Slot ``slot`` as a dense vector (tests, diagnostics)."""
        if self.dense:
            return state["window_values"][slot].clone()
        out = torch.zeros(self.d, dtype=torch.float32, device=state["window_values"].device)
        return out.index_copy_(0, state["window_indices"][slot].long(), state["window_values"][slot])


# ------------------------------------------------------------------------------------------------
# low-rank window
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One parameter's slice of the flattened group vector and where its compressed form is stored.

    ``rows > 0``: a matrix ``rows x cols`` compressed to rank ``r`` (factor columns at ``left`` /
    ``right`` of the factor rows); ``rows == 0``: stored exactly at ``exact`` of the exact rows.
    """

    offset: int
    numel: int
    rows: int = 0
    cols: int = 0
    left: int = 0
    right: int = 0
    exact: int = 0


def plan_segments(shapes: list[torch.Size], rank: int) -> tuple[list[Segment], int, int, int]:
    """Segments for parameters of ``shapes`` (in order); returns them and the left / right / exact widths."""
    segments: list[Segment] = []
    offset = left = right = exact = 0
    for shape in shapes:
        numel = int(torch.Size(shape).numel())
        rows = int(shape[0]) if len(shape) >= 2 else 0
        cols = numel // rows if rows else 0
        if rows and min(rows, cols) > rank:  # a rank-r factor pair is smaller than the matrix
            segments.append(Segment(offset, numel, rows, cols, left=left, right=right))
            left += rows * rank
            right += cols * rank
        else:
            segments.append(Segment(offset, numel, exact=exact))
            exact += numel
        offset += numel
    return segments, left, right, exact


@dataclass(frozen=True)
class LowRankWindow:
    """Ring of rank-r compressed gradients (one factor pair per matrix parameter)."""

    m: int
    d: int
    rank: int
    segments: tuple[Segment, ...]
    left_width: int
    right_width: int
    exact_width: int

    @classmethod
    def for_shapes(cls, m: int, shapes: list[torch.Size], rank: int) -> LowRankWindow:
        segments, left, right, exact = plan_segments(shapes, rank)
        d = sum(s.numel for s in segments)
        return cls(m, d, rank, tuple(segments), left, right, exact)

    def init_state(self, state: dict, device: torch.device) -> None:
        state["window_left"] = torch.zeros(self.m, self.left_width, dtype=torch.float32, device=device)
        state["window_right"] = torch.zeros(self.m, self.right_width, dtype=torch.float32, device=device)
        state["window_exact"] = torch.zeros(self.m, self.exact_width, dtype=torch.float32, device=device)
        state["error"] = torch.zeros(self.d, dtype=torch.float32, device=device)

    def _factors(self, state: dict, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots' factors of one matrix: ``(m, rows, r)`` and ``(m, cols, r)`` views."""
        r = self.rank
        left = state["window_left"][:, seg.left : seg.left + seg.rows * r].view(self.m, seg.rows, r)
        right = state["window_right"][:, seg.right : seg.right + seg.cols * r].view(self.m, seg.cols, r)
        return left, right

    def _exact_view(self, state: dict, seg: Segment) -> torch.Tensor:
        return state["window_exact"][:, seg.exact : seg.exact + seg.numel]

    def _warm_start(self, state: dict, seg: Segment, slot: int, generator: torch.Generator | None) -> torch.Tensor:
        """The power iteration's start: the previous step's ``Q`` (PowerSGD's warm start); random at step 1.

        The step-1 draw comes from a fixed-seed CPU generator, so a resumed run needs no saved RNG state.
        """
        if generator is not None:
            start = torch.randn(seg.cols, self.rank, generator=generator, dtype=torch.float32)
            return start.to(state["error"].device)
        _, right = self._factors(state, seg)
        return right[(slot - 1) % self.m]

    def insert(self, state: dict, grad: torch.Tensor, slot: int, step: int) -> torch.Tensor:
        """Error feedback + rank-r compression of ``grad`` into ``slot``; returns ``G c``."""
        acc = state["error"].add_(grad)  # a_t = e_{t-1} + g_t, in the error buffer
        generator = torch.Generator().manual_seed(0) if step == 1 else None
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, seg in enumerate(self.segments):
            a = acc[seg.offset : seg.offset + seg.numel]
            if not seg.rows:  # stored exactly: c = a, e = 0
                self._exact_view(state, seg)[slot].copy_(a)
                a.zero_()
                continue
            a = a.view(seg.rows, seg.cols)
            p = torch.linalg.qr(a @ self._warm_start(state, seg, slot, generator)).Q  # orthonormal rows x r
            q = a.T @ p
            a.sub_(p @ q.T)  # e_t = a_t - P Q^T
            left, right = self._factors(state, seg)
            left[slot].copy_(p)
            right[slot].copy_(q)
            new[i] = (p, q)
        return self._gram_row(state, slot, new)

    def _gram_row(self, state: dict, slot: int, new: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``G c`` for the compressed gradient just stored in ``slot``, from factor inner products."""
        exact = state["window_exact"]
        row = exact @ exact[slot]
        for i, (p, q) in new.items():
            left, right = self._factors(state, self.segments[i])
            pp = torch.einsum("mar,as->mrs", left, p)
            qq = torch.einsum("mbr,bs->mrs", right, q)
            row += (pp * qq).sum(dim=(1, 2))
        return row

    def dots(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        """``G x`` for any ``x``: ``<P Q^T, X> = sum(P * (X Q))`` per matrix."""
        row = torch.zeros(self.m, dtype=torch.float32, device=x.device)
        for seg in self.segments:
            xs = x[seg.offset : seg.offset + seg.numel]
            if not seg.rows:
                row += self._exact_view(state, seg) @ xs
                continue
            left, right = self._factors(state, seg)
            xq = torch.einsum("ab,mbr->mar", xs.view(seg.rows, seg.cols), right)
            row += (left * xq).sum(dim=(1, 2))
        return row

    def combine(self, state: dict, coef: torch.Tensor) -> torch.Tensor:
        """``G^T coef``: per matrix ``sum_j coef_j P_j Q_j^T`` as one (rows x m r) @ (m r x cols) product."""
        out = torch.empty(self.d, dtype=torch.float32, device=coef.device)
        for seg in self.segments:
            target = out[seg.offset : seg.offset + seg.numel]
            if not seg.rows:
                target.copy_(coef @ self._exact_view(state, seg))
                continue
            left, right = self._factors(state, seg)
            weighted = left * coef.view(self.m, 1, 1)
            target.view(seg.rows, seg.cols).copy_(torch.einsum("mar,mbr->ab", weighted, right))
        return out

    def reconstruct(self, state: dict, slot: int) -> torch.Tensor:
        """Slot ``slot`` as a dense vector (tests, diagnostics)."""
        coef = torch.zeros(self.m, dtype=torch.float32, device=state["error"].device)
        coef[slot] = 1.0
        return self.combine(state, coef)
