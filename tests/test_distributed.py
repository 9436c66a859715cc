"""Q4Shampoo under DDP with the preconditioner work split among ranks (distributed.py, issue 16).

The multi-process tests run tests/ddp_worker.py on 2 and then 4 CPU processes (gloo): the second run resumes
from the first one's whole state at the half-way step, on the other world size.
"""

import json
import math
import os
import subprocess
import sys

import ddp_worker
import pytest
import torch
from ddp_worker import FORMS, HALF, OPTIONS, SHAPES, make_params

from hf_q4shampoo import Q4Shampoo, distributed
from hf_q4shampoo.config import ConfigError, Q4ShampooConfig, parse_optim_args
from hf_q4shampoo.distributed import is_root_key, strip_statistics
from hf_q4shampoo.owner_balance import (
    assign_owners,
    busiest_rank_mean,
    refresh_round_ms,
    step_profiles,
    step_share_cost,
)

from tiny_hf import one_torch_thread  # noqa: F401 (autouse: the references run on one thread, as the ranks do)

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


# ---- in one process -----------------------------------------------------------------------------


def test_assign_owners_balances_work_and_is_deterministic():
    units = [(1000, 0, 0)] + [(100, i % 3, i % 5) for i in range(30)] + [(7, 1, 1)] * 5
    for world in (2, 3, 4):
        owners = assign_owners(units, world)
        assert owners == assign_owners(list(units), world)  # depends only on the units
        assert set(owners) == set(range(world))
        load = [sum(u[0] for u, o in zip(units, owners) if o == r) for r in range(world)]
        ideal = sum(u[0] for u in units) / world
        # within 20% of an even split (or the largest matrix): the greedy also balances each step's work
        assert max(load) <= max(ideal * 1.2, 1000), (world, load)


def test_assign_owners_spreads_each_steps_refreshes():
    # eight equal matrices refreshed at two offsets: each rank gets two of each offset, not four of one
    units = [(10, 0, i % 2) for i in range(8)]
    owners = assign_owners(units, 2)
    for offset in (0, 1):
        assert sorted(o for u, o in zip(units, owners) if u[2] == offset) == [0, 0, 1, 1]


def test_assign_owners_balances_refresh_rounds_apart_from_the_total():
    # shard_parameters' units: the total is the per-step share, a refresh step carries one whole round. One large
    # and three small parameters; two rounds fall on root step 0, two on root step 1. By the totals alone the large
    # one's rank would hold nothing else (3 against 1 + 1 + 1), both step-1 rounds on the other rank: that step it
    # would work 16 ms while this one waits. Balanced step by step, each step's two rounds go to different ranks.
    units = [(3.0, 0, 0, 0.1, 8.0), (1.0, 0, 0, 0.1, 8.0), (1.0, 0, 1, 0.1, 8.0), (1.0, 0, 1, 0.1, 8.0)]
    by_total = assign_owners([(u[0], 0, 0) for u in units], 2)
    assert by_total[2] == by_total[3]  # the imbalance the per-step terms remove
    owners = assign_owners(units, 2)
    for step in (0, 1):
        assert sorted(o for u, o in zip(units, owners) if u[2] == step) == [0, 1], owners
    assert owners == assign_owners(list(units), 2)


def _random_units(gen, n):
    # shard_parameters-like units: every-step work from numel, refresh rounds from a refresh cost, spread offsets
    units = []
    for _ in range(n):
        refresh = int(torch.randint(10**8, 5 * 10**9, (), generator=gen))
        numel = int(torch.randint(10**5, 4 * 10**7, (), generator=gen))
        offsets = int(torch.randint(0, 5, (), generator=gen)), 5 + int(torch.randint(0, 25, (), generator=gen))
        units.append((step_share_cost(refresh, numel, 10, 100), *offsets, *refresh_round_ms(refresh)))
    return units


def test_step_profiles_spread_each_units_cost_over_the_period():
    units = _random_units(torch.Generator().manual_seed(1), 12)
    profiles = step_profiles(units, (10, 100))
    assert profiles.shape == (12, 100)
    for u, row in zip(units, profiles):
        assert row.sum() == pytest.approx(100 * u[0], rel=1e-9)  # the per-step total, amortised
        assert row.max() - row.min() == pytest.approx(u[4] + (u[3] if u[1] % 10 == u[2] % 10 else 0), rel=1e-9)


def test_refined_owners_lower_the_busiest_ranks_mean_to_a_local_optimum():
    improved = 0
    for seed in range(6):
        units = _random_units(torch.Generator().manual_seed(seed), 40)
        profiles = step_profiles(units, (10, 100))
        for world in (2, 4):
            greedy = assign_owners(units, world)
            refined = assign_owners(units, world, (10, 100))
            assert refined == assign_owners(list(units), world, (10, 100))  # the same on every rank
            before, after = busiest_rank_mean(profiles, greedy, world), busiest_rank_mean(profiles, refined, world)
            assert after <= before + 1e-9
            improved += after < before - 1e-6
            for i in range(len(units)):  # no single move lowers it further
                for rank in range(world):
                    moved = list(refined)
                    moved[i] = rank
                    assert busiest_rank_mean(profiles, moved, world) >= after - 1e-9
    assert improved >= 6, improved  # the greedy's per-step terms leave room on most draws


def test_strip_statistics_keeps_roots_only():
    params = make_params()
    opt = Q4Shampoo(params, **OPTIONS)
    opt.build_state()
    state = opt.state[params[0]]
    strip_statistics(state)
    for sides in state["regions"]:
        for side in sides.values():
            assert side and all(is_root_key(k) for k in side)
    assert "exp_avg_codes" in state  # first-order moments stay on every rank


def test_shard_preconditioners_option_is_validated():
    assert Q4ShampooConfig().shard_preconditioners is True
    assert parse_optim_args("shard_preconditioners=false") == {"shard_preconditioners": False}
    with pytest.raises(ConfigError, match="shard_preconditioners must be true or false, got 'yes please'"):
        Q4ShampooConfig(shard_preconditioners="yes please")
    with pytest.raises(ConfigError, match=r"shard_preconditioners='maybe' is not true or false"):
        parse_optim_args("shard_preconditioners=maybe")


def test_single_process_is_not_split(tmp_path):
    params = make_params()
    opt = Q4Shampoo(params, **OPTIONS)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.distributed_info() is None
    opt.consolidate_state_dict()  # nothing to gather: a no-op
    sd = opt.state_dict()
    assert "q4shampoo_shard" not in sd
    sd["q4shampoo_shard"] = {"rank": 1, "world_size": 4}  # a rank's share, loaded into one process
    with pytest.raises(ConfigError, match="rank 1's share .* world size 4.* rank 0 of world size 1"):
        Q4Shampoo(make_params(), **OPTIONS).load_state_dict(sd)


# ---- several processes ---------------------------------------------------------------------------


def _launch(out, world, resume=None, worker=WORKER, report="report", options=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_Q4SHAMPOO_AUTO_REGISTER": "0"}
    env["Q4_WORKER_OPTIONS"] = json.dumps(options or {})
    extra = [str(resume)] if resume else []
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(out), str(r), str(world), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    errors = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode:
            errors.append(err[-3000:])
    assert not errors, "\n".join(errors)
    return [json.loads((out / f"{report}-rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp2")
    return out, _launch(out, 2)


def _load(path):
    return torch.load(path, weights_only=True)


def _single_process(form, grads, steps, **overrides):
    params = make_params()
    opt = Q4Shampoo(params, precond=form, **{**OPTIONS, **overrides})
    for step_grads in grads[:steps]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _flat(value, prefix=""):
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flat(v, f"{prefix}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flat(v, f"{prefix}.{i}")


def _close(a, b):
    """Equal up to the last bits of a few eigendecompositions: MKL's eigh (CPU) does not promise bitwise equal
    results for equal inputs in different batches; a missing or wrong root exchange changes parameters by
    orders of magnitude more (checked by test_a_missing_root_exchange_would_be_caught)."""
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b)) <= 1e-6


def _check_like_one_process(out, form):
    """Bitwise equal replicas, the single process within ``_close`` on the same gradients, and the whole state
    gathered from both ranks equal to the single-process state (same keys, bitwise the same statistics).
    Returns the gradients and the single-process optimizer after all of them."""
    finals = [_load(out / f"{form}-final-rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*finals))  # bitwise equal replicas
    grads = _load(out / f"{form}-grads.pt")
    params, opt = _single_process(form, grads, len(grads))
    assert _close(finals[0], params)
    _, opt_half = _single_process(form, grads, HALF)
    whole = dict(_flat(_load(out / f"{form}-half-whole.pt")["state"]))
    single = dict(_flat(opt_half.state_dict()["state"]))
    assert whole.keys() == single.keys()
    statistics = [k for k in whole if not is_root_key(k.rsplit(".", 1)[1]) and ".regions." in k]
    assert statistics and all(torch.equal(whole[k], single[k]) for k in statistics)
    return grads, opt


def _check_resumes_exactly(out, form):
    """Runs resumed at the half-way step from each rank's share and from the whole state end where the
    uninterrupted run did, bitwise, on both ranks."""
    final = _load(out / f"{form}-final-rank0.pt")
    for source in ("share", "whole"):
        for rank in (0, 1):
            resumed = _load(out / f"{form}-resumed-{source}-rank{rank}.pt")
            assert all(torch.equal(a, b) for a, b in zip(resumed, final)), (source, rank)


@pytest.fixture(scope="module")
def two_ranks_root8(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp2_root8")
    return out, _launch(out, 2, options={"root_bits": 8})


def test_eight_bit_roots_are_exchanged_whole(two_ranks_root8):
    # root_bits=8's second code is a root key (``root_res_*``): the owners' all-gather must carry it, or the other
    # rank would apply the first code alone (4-bit roots) and the replicas would part
    out, _ = two_ranks_root8
    finals = [_load(out / f"cholesky_ef-final-rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*finals))  # bitwise equal replicas
    grads = _load(out / "cholesky_ef-grads.pt")
    params, _ = _single_process("cholesky_ef", grads, len(grads), root_bits=8)
    assert _close(finals[0], params)
    params4, _ = _single_process("cholesky_ef", grads, len(grads))
    assert not _close(finals[0], params4)  # 4-bit roots end elsewhere: the check above can tell them apart


@pytest.mark.parametrize("form", FORMS)
def test_two_ranks_match_each_other_and_one_process(two_ranks, form):
    out, reports = two_ranks
    grads, opt = _check_like_one_process(out, form)
    # the work was split: both ranks own matrices and exchanged roots on refresh steps only
    info = reports[0][form]["info"]
    assert info["world_size"] == 2 and min(info["owned_per_rank"]) >= 3
    # every rank updates every parameter itself: no CUDA graph, whose rounding a rank's own trial would choose
    assert not any(r[form]["graph_allowed"] for r in reports)
    # Q4AdamW: the 4bit variant's graphed step equals its eager one; the factored v's may not, so it is eager here
    assert all(r["q4adamw_graph_allowed"] == {"4bit": True, "factor": False} for r in reports)
    refresh_steps = len(
        {
            s
            for s in range(1, len(grads) + 1)
            if any((s - o) > 0 and (s - o) % OPTIONS["root_freq"] == 0 for o in range(OPTIONS["refresh_spread"]))
        }
    )
    assert 0 < info["exchanges"] <= refresh_steps
    # the shape groups, hence the update's batched calls, are one process's: not split by owner
    assert reports[0][form]["groups"] == [[list(g.shape), g.size] for g in opt._current_layout().groups]
    assert len(reports[0][form]["groups"]) < len(SHAPES)  # same-shape matrices of both owners share a group


@pytest.mark.parametrize("form", FORMS)
def test_statistics_bytes_per_rank_are_about_half(two_ranks, form):
    out, reports = two_ranks
    grads = _load(out / f"{form}-grads.pt")
    params, opt = _single_process(form, grads, 2)

    def split_bytes(per_param):
        return sum(d.get("statistics", 0) + d.get("error_feedback", 0) for d in per_param)

    single = split_bytes(opt.state_bytes(p) for p in params)
    per_rank = [split_bytes(r[form]["bytes"]) for r in reports]
    assert sum(per_rank) == single  # every statistic is held exactly once
    assert max(per_rank) <= 0.6 * single, (per_rank, single)
    roots = [sum(d.get("roots", 0) for d in r[form]["bytes"]) for r in reports]
    assert roots[0] == roots[1] == sum(opt.state_bytes(p).get("roots", 0) for p in params)  # every rank: all roots


@pytest.mark.parametrize("form", FORMS)
def test_resume_at_the_same_world_size_is_exact(two_ranks, form):
    _check_resumes_exactly(two_ranks[0], form)


def test_resume_on_four_ranks_reshards_the_whole_state(two_ranks, tmp_path):
    out2, _ = two_ranks
    reports = _launch(tmp_path, 4, resume=out2)
    for form in FORMS:
        finals = [_load(tmp_path / f"{form}-final-rank{r}.pt") for r in range(4)]
        assert all(torch.equal(a, b) for f in finals[1:] for a, b in zip(finals[0], f))
        # the single-process run on the 2-rank gradients to the half, then on the 4-rank ones
        grads = _load(out2 / f"{form}-grads.pt")[:HALF] + _load(tmp_path / f"{form}-grads.pt")
        assert len(grads) == ddp_worker.STEPS
        params, _ = _single_process(form, grads, len(grads))
        assert _close(finals[0], params)
        assert reports[0][form]["info"]["world_size"] == 4
        # a share of the 2-rank run cannot be loaded on 4 ranks: the message names both
        message = reports[1][form + "-share-error"]
        assert message and "rank 1's share" in message and "world size 2" in message and "world size 4" in message


def test_a_missing_root_exchange_would_be_caught(two_ranks):
    # the tolerance of _close is far below what a rank applying stale roots would change: here the extreme,
    # roots that stay the identity (never refreshed), against the run that refreshes them
    out, _ = two_ranks
    grads = _load(out / "cholesky_ef-grads.pt")
    params, _ = _single_process("cholesky_ef", grads, len(grads))
    stale, _ = _single_process("cholesky_ef", grads, len(grads), root_freq=1000)
    assert not _close(params, stale)


# ---- shard_parameters: owners update their matrices whole, the ranks all-gather the parameters -------------

WHOLE = {"shard_parameters": True}


@pytest.fixture(scope="module")
def two_ranks_whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp2_whole")
    return out, _launch(out, 2, options=WHOLE)


@pytest.mark.parametrize("form", FORMS)
def test_whole_parameter_shards_match_each_other_and_one_process(two_ranks_whole, form):
    out, reports = two_ranks_whole
    _check_like_one_process(out, form)  # the all-gather makes the replicas bitwise equal
    # one parameter all-gather per step and no root exchange (an owner applies its own roots)
    info = reports[0][form]["info"]
    assert info["parameter_exchanges"] == ddp_worker.STEPS and info["exchanges"] == 0
    # an owner's update may be CUDA-graphed: the all-gather gives every replica the owner's bytes either way
    assert all(r[form]["graph_allowed"] for r in reports)
    assert info["parameter_bytes_received"] > 0 and min(info["owned_per_rank"]) >= 3
    # each step receives the other rank's slice of the flat buffer: the longer share, padded, of the fp32 parameters
    total = sum(4 * math.prod(shape) for shape in SHAPES)
    per_exchange = info["parameter_bytes_received"] / info["parameter_exchanges"]
    assert total / 2 <= per_exchange <= total + 8 * len(SHAPES), (per_exchange, total)


@pytest.mark.parametrize("form", FORMS)
def test_whole_parameter_shards_hold_each_matrix_state_once(two_ranks_whole, form):
    out, reports = two_ranks_whole
    grads = _load(out / f"{form}-grads.pt")
    params, opt = _single_process(form, grads, 2)
    matrices = [i for i, shape in enumerate(SHAPES) if len(shape) == 2]
    vector = [i for i, shape in enumerate(SHAPES) if len(shape) == 1]
    single = [sum(opt.state_bytes(params[i]).values()) for i in range(len(SHAPES))]
    per_rank = [[sum(d.values()) for d in r[form]["bytes"]] for r in reports]
    for i in matrices:  # every matrix's whole state (moments and roots included) lives on exactly one rank
        held = [b[i] for b in per_rank]
        assert sorted(held) == [0, single[i]], (i, held)
    for i in vector:  # so does a vector's (its first-order moments): an owner updates every parameter
        assert sorted(b[i] for b in per_rank) == [0, single[i]], i
    assert max(sum(b) for b in per_rank) <= 0.65 * sum(single), (per_rank, single)


@pytest.mark.parametrize("form", FORMS)
def test_whole_parameter_shards_resume_exactly(two_ranks_whole, form):
    _check_resumes_exactly(two_ranks_whole[0], form)


def test_whole_parameter_shards_reshard_onto_four_ranks(two_ranks_whole, tmp_path):
    out2, _ = two_ranks_whole
    reports = _launch(tmp_path, 4, resume=out2, options=WHOLE)
    for form in FORMS:
        finals = [_load(tmp_path / f"{form}-final-rank{r}.pt") for r in range(4)]
        assert all(torch.equal(a, b) for f in finals[1:] for a, b in zip(finals[0], f))
        grads = _load(out2 / f"{form}-grads.pt")[:HALF] + _load(tmp_path / f"{form}-grads.pt")
        params, _ = _single_process(form, grads, len(grads))
        assert _close(finals[0], params)
        assert reports[0][form]["info"]["world_size"] == 4


def test_step_share_cost_weighs_every_stage():
    # more entries, more frequent statistics or more frequent roots: each makes owning the matrix cost more per step
    cheap_refresh = step_share_cost(refresh=10**9, numel=10**7, update_freq=10, root_freq=100)
    assert cheap_refresh > step_share_cost(refresh=10**9, numel=10**6, update_freq=10, root_freq=100)
    assert step_share_cost(10**9, 10**6, 1, 100) > step_share_cost(10**9, 10**6, 10, 100)
    assert step_share_cost(10**9, 10**6, 10, 10) > step_share_cost(10**9, 10**6, 10, 100)


def test_shared_parameters_move_into_one_flat_buffer_by_owner():
    g = torch.Generator().manual_seed(3)
    mine = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    conv = torch.randn(4, 3, 2, 2, generator=g).to(memory_format=torch.channels_last)
    theirs = [torch.nn.Parameter(conv), torch.nn.Parameter(torch.randn(2, 2, generator=g).to(torch.bfloat16))]
    before = [p.detach().clone() for p in mine + theirs]
    ids = [id(p) for p in mine + theirs]
    shared = distributed.SharedParameters([mine, theirs], world_size=2)
    # the same Parameter objects, the same values, shapes, strides and dtypes; their bytes now in the buffer
    assert [id(p) for p in mine + theirs] == ids
    for p, old in zip(mine + theirs, before):
        assert torch.equal(p, old) and p.stride() == old.stride() and p.dtype == old.dtype
    assert theirs[0].is_contiguous(memory_format=torch.channels_last)
    assert shared.slice_bytes == 48 * 4 + 4 * 2  # the longer share: 192 + 8 bytes (the other: 144 + 16, aligned)
    flat = shared.flat
    for owner, params in enumerate([mine, theirs]):
        lo = flat.data_ptr() + owner * shared.slice_bytes
        assert all(lo <= p.data_ptr() < lo + shared.slice_bytes for p in params)
    # a write into the buffer is a write into the parameter: what an in-place all-gather relies on
    shared.slice(1).zero_()
    assert not theirs[0].any() and not theirs[1].any() and torch.equal(mine[0], before[0])
    assert shared.still_holds(shared.by_owner)
    mine[0].data = mine[0].data.clone()  # e.g. model.to(...): the buffer is laid out again at the next exchange
    assert not shared.still_holds(shared.by_owner)


def test_shared_parameters_refuse_what_cannot_move():
    base = torch.randn(6, 8)
    with pytest.raises(ValueError, match="share one storage"):
        distributed.SharedParameters([[torch.nn.Parameter(base[:3])], [torch.nn.Parameter(base[3:])]], 2)
    with pytest.raises(ValueError, match="not dense in memory"):
        distributed.SharedParameters([[torch.nn.Parameter(torch.randn(6, 8)[:, ::2])], []], 2)


def test_shard_parameters_option_is_validated():
    assert Q4ShampooConfig().shard_parameters is False
    assert parse_optim_args("shard_parameters=true") == {"shard_parameters": True}
    with pytest.raises(ConfigError, match="shard_parameters must be true or false"):
        Q4ShampooConfig(shard_parameters="all of them")


# ---- FSDP2: distributed checkpoints -----------------------------------------------------------------


def test_fsdp2_dcp_and_full_state_checkpoints_resume_bitwise(tmp_path):
    # FSDP2 runs on CPU with gloo in torch 2.13: this test needs no GPU. One layer's rows split unevenly, so
    # the two ranks' states differ in shape; rank 0's state loaded on rank 1 (what plain tensors give under
    # DCP) fails or resumes elsewhere.
    reports = _launch(tmp_path, 2, worker=os.path.join(os.path.dirname(__file__), "fsdp2_worker.py"), report="fsdp2")
    for report in reports:
        assert report["ranks_differ"]  # each rank preconditions its own shard: its state is its own
        assert report["dcp"] == report["uninterrupted"]  # get_optimizer_state_dict + dcp.save / dcp.load
        assert report["full"] == report["uninterrupted"]  # full_state_dict=True (the Trainer's FULL_STATE_DICT)


# ---- through the Trainer --------------------------------------------------------------------------

TRAINER_SCRIPT = os.path.join(os.path.dirname(__file__), "fixtures", "train_tiny_clm.py")


def _torchrun(args, log):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hf_q4shampoo.launcher",
        TRAINER_SCRIPT,
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.heavy
@pytest.mark.parametrize("design", ["", ",shard_parameters=true"], ids=["split_preconditioners", "shard_parameters"])
def test_trainer_checkpoint_under_ddp_resumes_exactly(tmp_path, design):
    # the stock Trainer (an unmodified script through the launcher): registration makes it gather the ranks'
    # shares into optimizer.pt; the resumed run ends where the uninterrupted one did, on both ranks
    common = [
        "--optim",
        "q4shampoo",
        "--optim_args",
        "update_freq=1,root_freq=2,min_quant_numel=256" + design,
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--disable_tqdm",
        "true",
        "--max_steps",
        "8",
        "--seed",
        "0",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(["--output_dir", str(a), *common, "--save_strategy", "steps", "--save_steps", "4"], tmp_path / "a.log")
    saved = torch.load(a / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert "q4shampoo_shard" not in saved  # the whole state, not rank 0's share
    sides = [side for s in saved["state"].values() for sides in s.get("regions", []) for side in sides.values()]
    assert sides and all("factor_codes" in side for side in sides)
    _torchrun(
        ["--output_dir", str(b), *common, "--save_strategy", "no", "--resume_from_checkpoint", str(a / "checkpoint-4")],
        tmp_path / "b.log",
    )
    results = [json.loads((run / f"result-rank{r}.json").read_text()) for run in (a, b) for r in (0, 1)]
    assert len({r["param_checksum"] for r in results}) == 1
    assert results[0]["losses"][-4:] == results[2]["losses"][-4:]
    info = results[0]["optimizer_info"]  # the design that ran: matrices all-gathered every step, or roots exchanged
    assert info["world_size"] == 2 and (info["parameter_exchanges"] > 0) == bool(design), info
    # the launcher froze the garbage collector for the run (GCFreezeCallback) and unfroze it at the end
    assert all(r["gc_freeze_callback"] and r["gc_frozen_after_training"] == 0 for r in results)


@pytest.mark.heavy
def test_multi_gpu_bench_runs_on_cpu_processes(tmp_path):
    # benchmarks/multi_gpu_bench.py --tiny under torchrun with gloo: the script the GPU numbers come from
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "benchmarks", "multi_gpu_bench.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        bench,
        "--tiny",
        "--out",
        str(tmp_path),
        "--optimizers",
        "adamw,q4shampoo,q4shampoo_zero_balanced",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "multi_gpu_ddp_ws2.json").read_text())
    assert ddp["replicas_bitwise_equal"] == {"adamw": True, "q4shampoo": True, "q4shampoo_zero_balanced": True}
    # the other design (benchmarks/zero_design.py): each rank holds the state of its own parameters only
    zero = [next(r for r in rank if r["optimizer"] == "q4shampoo_zero_balanced") for rank in ddp["ranks"]]
    zero_bytes = [r["state_bytes"]["total"] for r in zero]
    assert all(0 < b < 0.75 * sum(zero_bytes) for b in zero_bytes), zero_bytes
    q4 = [next(r for r in rank if r["optimizer"] == "q4shampoo") for rank in ddp["ranks"]]
    comm = q4[0]["communication"]
    assert comm["exchanges"] > 0 and comm["received_bytes_per_step"] > 0 and "roots_exchange" in q4[0]["stages"]
    assert all(r["state_bytes"]["statistics"] > 0 for r in q4)
    fsdp = json.loads((tmp_path / "multi_gpu_fsdp2_ckpt_ws2.json").read_text())
    assert all(rank[0]["resumed_bitwise_equal"] for rank in fsdp["ranks"])
    assert all(rank[0]["uninterrupted_runs_bitwise_equal"] for rank in fsdp["ranks"])  # the control pair
