"""A plain, obviously-correct fp64 Shampoo (paper 2 Algorithm 4) for testing the optimizer.

No batching, no quantization, explicit loops over blocks; block boundaries, the aspect rule and the
schedule are re-derived here independently of ``hf_q4shampoo.blocking``.
"""

from __future__ import annotations

import math

import torch


def _chunks(length: int, size: int, precondition: bool) -> list[tuple[int, int]]:
    if not precondition:
        return [(0, length)]
    return [(s, min(s + size, length)) for s in range(0, length, size)]


def _root(mat: torch.Tensor, eps: float) -> torch.Tensor:
    lam, vec = torch.linalg.eigh(mat)
    lam = lam.clamp_min(0)
    return vec @ torch.diag((lam + eps * lam.max()) ** -0.25) @ vec.T


class ReferenceShampoo:
    def __init__(
        self,
        params,
        *,
        lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        first_order="adamw",
        momentum=0.9,
        nesterov=False,
        stat_decay=0.95,
        matrix_eps=1e-6,
        update_freq=1,
        root_freq=1,
        max_precond_dim=1024,
        max_aspect_ratio=16.0,
        min_precond_numel=64,
        grafting="norm",
    ):
        self.params = [p.detach().double().clone() for p in params]
        self.h = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            wd=weight_decay,
            first_order=first_order,
            momentum=momentum,
            nesterov=nesterov,
            beta=stat_decay,
            meps=matrix_eps,
            t1=update_freq,
            t2=root_freq,
            grafting=grafting,
        )
        self.t = 0
        self.blocks = []  # per param: list of dicts(rows, cols, L, R, Lr, Rr) or None
        for p in self.params:
            dims = [d for d in p.shape if d != 1]
            if len(dims) < 2 or math.prod(dims) < min_precond_numel:
                self.blocks.append(None)
                continue
            m, n = dims[0], math.prod(dims[1:])
            pre_rows = not (max_aspect_ratio and m > max_aspect_ratio * n)
            pre_cols = not (max_aspect_ratio and n > max_aspect_ratio * m)
            blocks = []
            for r0, r1 in _chunks(m, max_precond_dim, pre_rows):
                for c0, c1 in _chunks(n, max_precond_dim, pre_cols):
                    a, b = r1 - r0, c1 - c0
                    blocks.append(
                        dict(
                            rows=(r0, r1),
                            cols=(c0, c1),
                            L=matrix_eps * torch.eye(a, dtype=torch.float64) if pre_rows else None,
                            R=matrix_eps * torch.eye(b, dtype=torch.float64) if pre_cols else None,
                            Lr=torch.eye(a, dtype=torch.float64),
                            Rr=torch.eye(b, dtype=torch.float64),
                        )
                    )
            self.blocks.append((m, n, blocks))
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.last_direction = [None] * len(self.params)  # Adam grafting: the grafted direction of the last step

    def step(self, grads):
        h = self.h
        self.t += 1
        t = self.t
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g.double()
            d = g
            if self.blocks[i] is not None and h["grafting"] == "adam":
                self._adam_grafted_step(i, p, g)
                continue
            if self.blocks[i] is not None and h["grafting"] == "adam_filtered":
                self._filtered_grafted_step(i, p, g)
                continue
            if self.blocks[i] is not None:
                m, n, blocks = self.blocks[i]
                g2 = g.reshape(m, n)
                out = torch.empty_like(g2)
                for blk in blocks:
                    (r0, r1), (c0, c1) = blk["rows"], blk["cols"]
                    gb = g2[r0:r1, c0:c1]
                    self._refresh(blk, gb)
                    out[r0:r1, c0:c1] = blk["Lr"] @ gb @ blk["Rr"]
                out = out * (g2.norm() / (out.norm() + 1e-12))  # norm grafting per tensor
                d = out.reshape(g.shape)
            if h["first_order"] == "adamw":
                b1, b2 = h["betas"]
                p.mul_(1 - h["lr"] * h["wd"])
                self.m[i] = b1 * self.m[i] + (1 - b1) * d
                self.v[i] = b2 * self.v[i] + (1 - b2) * d * d
                denom = self.v[i].sqrt() / math.sqrt(1 - b2**t) + h["eps"]
                p.sub_(h["lr"] / (1 - b1**t) * self.m[i] / denom)
            else:
                d = d + h["wd"] * p
                self.m[i] = h["momentum"] * self.m[i] + d
                step_dir = d + h["momentum"] * self.m[i] if h["nesterov"] else self.m[i]
                p.sub_(h["lr"] * step_dir)

    def _refresh(self, blk, gb):
        """A block's statistics (every ``t1`` steps) and inverse 4th roots (every ``t2``) from its gradient ``gb``."""
        h, t = self.h, self.t
        if t % h["t1"] == 0:
            if blk["L"] is not None:
                blk["L"] = h["beta"] * blk["L"] + (1 - h["beta"]) * gb @ gb.T
            if blk["R"] is not None:
                blk["R"] = h["beta"] * blk["R"] + (1 - h["beta"]) * gb.T @ gb
        if t % h["t2"] == 0:
            if blk["L"] is not None:
                blk["Lr"] = _root(blk["L"], h["meps"])
            if blk["R"] is not None:
                blk["Rr"] = _root(blk["R"], h["meps"])

    def _grafted(self, blocks, g2, source, adam):
        """Per block: refresh from the gradient ``g2``, then Shampoo's direction of ``source`` (the gradient, or the
        momentum in Distributed Shampoo's order) at the norm of that block of ``adam``; ``adam`` itself before the
        first root."""
        out = adam.clone()
        for blk in blocks:
            (r0, r1), (c0, c1) = blk["rows"], blk["cols"]
            self._refresh(blk, g2[r0:r1, c0:c1])
            if self.t >= self.h["t2"]:  # a root exists
                pre = blk["Lr"] @ source[r0:r1, c0:c1] @ blk["Rr"]
                out[r0:r1, c0:c1] = pre * (adam[r0:r1, c0:c1].norm() / pre.norm())
        return out

    def _adam_grafted_step(self, i, p, g):
        """Distributed Shampoo's Adam grafting, written out: v of the raw gradient, each block's Shampoo
        direction at the norm of that block's Adam step (the Adam step itself before the first root), momentum
        on the result, decoupled decay."""
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        m, n, blocks = self.blocks[i]
        g2 = g.reshape(m, n)
        self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
        adam = (g / ((self.v[i] / (1 - b2**t)).sqrt() + h["eps"])).reshape(m, n)
        out = self._grafted(blocks, g2, g2, adam)
        self.last_direction[i] = out.reshape(g.shape)
        self.m[i] = b1 * self.m[i] + (1 - b1) * out.reshape(g.shape)
        p.mul_(1 - h["lr"] * h["wd"])
        p.sub_(h["lr"] / (1 - b1**t) * self.m[i])

    def _filtered_grafted_step(self, i, p, g):
        """Distributed Shampoo's order, written out: momentum m and second moment v of the raw gradient, each
        block's Shampoo direction of the bias-corrected momentum M at the norm of that block's AdamW step
        M / (sqrt(v^) + eps) (the AdamW step itself before the first root), decoupled decay, no second momentum."""
        h, t = self.h, self.t
        b1, b2 = h["betas"]
        m, n, blocks = self.blocks[i]
        g2 = g.reshape(m, n)
        self.m[i] = b1 * self.m[i] + (1 - b1) * g
        self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
        filtered = (self.m[i] / (1 - b1**t)).reshape(m, n)
        adam = filtered / ((self.v[i] / (1 - b2**t)).sqrt() + h["eps"]).reshape(m, n)
        out = self._grafted(blocks, g2, filtered, adam)
        self.last_direction[i] = out.reshape(g.shape)
        p.mul_(1 - h["lr"] * h["wd"])
        p.sub_(h["lr"] * out.reshape(g.shape))
