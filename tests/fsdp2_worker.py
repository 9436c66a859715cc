"""One rank of the FSDP2 checkpoint test (tests/test_distributed.py), gloo on CPU.

    python tests/fsdp2_worker.py OUT_DIR RANK WORLD_SIZE

A two-layer model under ``fully_shard`` (one layer's rows do not split evenly, so the ranks' states have
different shapes), Q4Shampoo for ``STEPS`` steps with a checkpoint at ``HALF`` through
``get_optimizer_state_dict`` + ``dcp.save`` (sharded) and through ``full_state_dict=True`` (gathered);
then a fresh model and optimizer resume from each and run to ``STEPS``. Writes each run's final full
parameters and whether the ranks' saved statistics differ (so that a checkpoint keeping rank 0's state for
every rank would be caught).
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_q4shampoo import Q4Shampoo  # noqa: E402

STEPS, HALF = 8, 4
OPTIONS = dict(update_freq=1, root_freq=2, min_quant_numel=256, first_order_min_quant_numel=64, lr=0.01)


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 95), torch.nn.Tanh(), torch.nn.Linear(95, 64))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model, Q4Shampoo(model.parameters(), **OPTIONS)


def step(model, opt, t, rank):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(10 * t + rank))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def main():
    out, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank, world_size=world
    )
    full = StateDictOptions(full_state_dict=True)
    model, opt = build()
    for t in range(HALF):
        step(model, opt, t, rank)
    sharded = get_optimizer_state_dict(model, opt)
    dcp.save({"model": get_model_state_dict(model), "optim": sharded}, checkpoint_id=os.path.join(out, "dcp"))
    # copies, as a checkpoint written now would hold (a state dict shares tensors with the live state)
    gathered = copy.deepcopy(get_optimizer_state_dict(model, opt, options=full))
    model_full = copy.deepcopy(get_model_state_dict(model, options=full))
    codes = opt.state[next(iter(model.parameters()))]["regions"][0]["R"]["factor_codes"]
    others = [None] * world
    dist.all_gather_object(others, codes)
    report = {"ranks_differ": not torch.equal(others[0], others[1])}
    for t in range(HALF, STEPS):
        step(model, opt, t, rank)
    report["uninterrupted"] = [p.full_tensor().tolist() for p in model.parameters()]
    for source in ("dcp", "full"):
        model2, opt2 = build()
        if source == "dcp":
            template = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
            dcp.load(template, checkpoint_id=os.path.join(out, "dcp"))
            set_model_state_dict(model2, template["model"])
            set_optimizer_state_dict(model2, opt2, template["optim"])
        else:
            set_model_state_dict(model2, model_full, options=full)
            set_optimizer_state_dict(model2, opt2, gathered, options=full)
        for t in range(HALF, STEPS):
            step(model2, opt2, t, rank)
        report[source] = [p.full_tensor().tolist() for p in model2.parameters()]
    with open(os.path.join(out, f"fsdp2-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without the interpreter's teardown: with gloo on CPU it occasionally aborts there ("terminate called
    # without an active exception") after everything is written and the process group destroyed
    os._exit(0)
