"""One rank of the multi-process Q4Shampoo tests (tests/test_distributed.py), gloo on CPU.

    python tests/ddp_worker.py OUT_DIR RANK WORLD_SIZE [RESUME_FROM]

Trains the matrices of :func:`make_params` for ``STEPS`` steps on gradients that each rank draws for itself and
all-reduces (the mean), as DDP does, with the preconditioner work split among the ranks; saves what the test
compares: the all-reduced gradients (rank 0), the final parameters, the state bytes, this rank's share of the
state at ``HALF`` and the whole (consolidated) state at ``HALF`` (rank 0). ``RESUME_FROM``: a folder of an earlier
run, whose consolidated state at ``HALF`` this run loads (on its own world size) and continues from, and whose
rank-1 share it then tries to load (which must fail when the world size differs). ``Q4_WORKER_OPTIONS`` (JSON)
adds options to every optimizer (e.g. ``{"shard_parameters": true}``).
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_q4shampoo import Q4AdamW, Q4Shampoo  # noqa: E402
from hf_q4shampoo.config import ConfigError  # noqa: E402

STEPS, HALF = 12, 6
#: small enough for two CPU cores, varied enough to split: blocked matrices, 4-bit and fp32 factors, a vector
OPTIONS = dict(
    update_freq=2,
    root_freq=4,
    refresh_spread=2,
    max_precond_dim=48,
    min_quant_numel=256,
    first_order_min_quant_numel=64,
    lr=0.01,
    weight_decay=0.01,
)
SHAPES = [(48, 40)] * 6 + [(96, 40)] * 2 + [(40, 24), (12, 20), (40,)]
FORMS = ("cholesky_ef", "eigen")
#: more options for every optimizer of a run, as JSON (the tests run the worker once with shard_parameters on)
OPTIONS.update(json.loads(os.environ.get("Q4_WORKER_OPTIONS", "{}")))


def make_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).mul_(0.1).requires_grad_() for shape in SHAPES]


def rank_grads(step: int, rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(*shape, generator=g) * (1 + rank) for shape in SHAPES]


def train(
    opt: Q4Shampoo,
    params: list[torch.Tensor],
    steps: range,
    rank: int,
    world: int,
    grads_out: list | None = None,
    at_half=None,
) -> None:
    for step in steps:
        grads = rank_grads(step, rank)
        for p, grad in zip(params, grads):
            dist.all_reduce(grad)
            p.grad = grad.div_(world)
        if grads_out is not None:
            grads_out.append([p.grad.clone() for p in params])
        opt.step()
        if step + 1 == HALF and at_half is not None:
            at_half()


def main() -> None:
    out, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank, world_size=world
    )
    report: dict = {}
    for form in FORMS:
        params = make_params()
        opt = Q4Shampoo(params, precond=form, **OPTIONS)
        grads: list = []

        def save_half(opt=opt, params=params, form=form):
            torch.save(
                {"params": [p.detach().clone() for p in params], "share": opt.state_dict()},
                os.path.join(out, f"{form}-half-rank{rank}.pt"),
            )
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                torch.save(opt.state_dict(), os.path.join(out, f"{form}-half-whole.pt"))

        if resume is None:
            train(opt, params, range(STEPS), rank, world, grads, save_half)
        else:  # continue another world size's run from its whole state at HALF
            half = torch.load(os.path.join(resume, f"{form}-half-rank0.pt"))
            with torch.no_grad():
                for p, value in zip(params, half["params"]):
                    p.copy_(value)
            opt.load_state_dict(torch.load(os.path.join(resume, f"{form}-half-whole.pt")))
            train(opt, params, range(HALF, STEPS), rank, world, grads)
            other = torch.load(os.path.join(resume, f"{form}-half-rank1.pt"))["share"]
            try:
                Q4Shampoo(make_params(), precond=form, **OPTIONS).load_state_dict(other)
                report[f"{form}-share-error"] = None
            except ConfigError as err:
                report[f"{form}-share-error"] = str(err)
        # resume at the same world size, from this rank's own share and from the whole state
        for source in ("share", "whole"):
            if resume is not None:
                break
            half = torch.load(os.path.join(out, f"{form}-half-rank{rank}.pt"))
            again = make_params()
            with torch.no_grad():
                for p, value in zip(again, half["params"]):
                    p.copy_(value)
            opt2 = Q4Shampoo(again, precond=form, **OPTIONS)
            dist.barrier()  # rank 0 wrote the whole state
            opt2.load_state_dict(
                half["share"] if source == "share" else torch.load(os.path.join(out, f"{form}-half-whole.pt"))
            )
            train(opt2, again, range(HALF, STEPS), rank, world)
            torch.save([p.detach() for p in again], os.path.join(out, f"{form}-resumed-{source}-rank{rank}.pt"))
        torch.save([p.detach() for p in params], os.path.join(out, f"{form}-final-rank{rank}.pt"))
        if rank == 0 and grads:
            torch.save(grads, os.path.join(out, f"{form}-grads.pt"))
        groups = [[list(g.shape), g.size] for g in opt._current_layout().groups]
        report[form] = {
            "bytes": [opt.state_bytes(p) for p in params],
            "info": opt.distributed_info(),
            "groups": groups,
            "graph_allowed": opt._graph_allowed_under_ddp(),  # the CUDA-graphed update (CUDA only) may run here
        }
    # Q4AdamW's graphed step (CUDA only) under several processes: the 4bit variant's equals its eager step, the
    # factored one's may not (graphed_update.py): whether each may run here
    report["q4adamw_graph_allowed"] = {
        variant: Q4AdamW(make_params(), variant=variant)._graph_config_ok() for variant in ("4bit", "factor")
    }
    with open(os.path.join(out, f"report-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without the interpreter's teardown: with gloo on CPU it occasionally aborts there ("terminate called
    # without an active exception") after everything is written and the process group destroyed
    os._exit(0)
