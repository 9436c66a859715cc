"""The step's update and its statistics updates as replayed CUDA graphs (``cuda_graph=True``): bit for bit what
the same update gives run eagerly, through a changing learning rate, refreshes in between, gradients that move
(``set_to_none=True``), a NaN gradient in a replayed step, chunked shape groups and matrices left outside the graph;
and, where the chunks are whole groups, bit for bit ``cuda_graph=False``. Q4AdamW's graphed step (whose chunks
split members, not sums) bit for bit ``cuda_graph=False`` in every case. Skipped without a GPU."""

import pytest
import torch

from hf_q4shampoo import Q4AdamW, Q4Shampoo, graphed_update, step_graph

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16: the biases' fp32 moments of bf16 parameters take the torch math, which runs eagerly beside the graph
CASES = [{}, {"move_grads": True}, {"nan_at": 18}, {"two_lrs": True}, {"keep_grads": True}, {"dtype": torch.bfloat16}]
IDS = ["plain", "moving", "nan", "two_lrs", "kept", "bf16"]


def _train(
    cuda_graph: bool,
    steps=24,
    two_lrs=False,
    move_grads=False,
    nan_at=-1,
    keep_grads=False,
    optimizer="q4shampoo",
    dtype=torch.float32,
    variant="4bit",
):
    torch.manual_seed(0)
    # three 96x96 matrices in one shape group, a 70x96 one: the Triton 4-bit AdamW (min_quant_numel=1024);
    # the biases: torch's fused AdamW (fp32 parameters) or the torch math (bf16: run eagerly beside the graph)
    layers = [torch.nn.Linear(96, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(96, 96), torch.nn.Tanh(), torch.nn.Linear(96, 70))
    model = model.to("cuda", dtype)
    params = list(model.parameters())
    groups = [{"params": params[:4]}, {"params": params[4:], "lr": 5e-3 if two_lrs else 1e-2}]
    if optimizer == "q4adamw":
        opt = Q4AdamW(groups, lr=1e-2, min_quant_numel=1024, cuda_graph=cuda_graph, variant=variant)
    else:
        opt = Q4Shampoo(groups, lr=1e-2, update_freq=2, root_freq=4, min_quant_numel=1024, cuda_graph=cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))  # a new lr every step
    g = torch.Generator().manual_seed(1)
    junk = []
    for i in range(steps):
        x, y = torch.randn(64, 96, generator=g).to("cuda", dtype), torch.randn(64, 70, generator=g).to("cuda", dtype)
        opt.zero_grad(set_to_none=not keep_grads)
        if move_grads:  # another allocation pattern every step: the gradients land at other addresses
            junk.append(torch.empty(4096 * (i % 3 + 1), device="cuda"))
        ((model(x) - y) ** 2).mean().backward()
        if i == nan_at:
            model[0].weight.grad[3, 5] = float("nan")
        opt.step()
        sched.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in params], opt


def _flat(tree, prefix=""):
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _assert_same(a, b) -> None:
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    fa, fb = _flat(oa.state_dict()), _flat(ob.state_dict())
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k


def _never_captured(monkeypatch) -> None:
    """StepGraph.run that takes the same decisions but runs eagerly where it would capture or replay (the same
    work and device tables, no graph): a key's first sighting the ordinary update, later ones the graph's form."""

    def run(self, key, work, prepare, pins=list, ordinary=None):
        previous, self._seen = self._seen, key
        self._streak = self._streak + 1 if key is not None and key == previous else 1
        if self._streak >= 3:
            self._key = key  # where the real rule captures
        if ordinary is not None and self._streak == 1 and key != self._key:
            ordinary()
            return
        if key is not None:
            prepare()
        work()

    monkeypatch.setattr(step_graph.StepGraph, "run", run)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_replays_equal_the_same_update_run_eagerly(case, monkeypatch):
    monkeypatch.setattr(graphed_update, "CHUNK_NUMEL", 96 * 96)  # the 96x96 group in chunks of one member
    graphed = _train(True, **case)
    counts = graphed[1]._graph_runner().counts
    if case.get("two_lrs"):  # two values of the lr scalar in one step: never captured
        assert counts.captures == 0 and counts.replays == 0
    else:
        # a key's first update runs the ordinary way, the second the graph's form eagerly, the third is captured,
        # the rest replay (the key changes while the factors get their first roots); moving gradients are read
        # through the address table
        assert counts.captures >= 1 and counts.replays >= 10 and counts.refused == 0, counts
    _never_captured(monkeypatch)
    _assert_same(graphed, _train(True, **case))
    if case.get("nan_at", -1) >= 0:
        assert graphed[1].skipped_updates() == 1


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_with_whole_groups_the_graph_equals_the_eager_optimizer(case):
    _assert_same(_train(True, **case), _train(False, **case))


@pytest.mark.parametrize(
    "case", [{}, {"move_grads": True}, {"nan_at": 18}, {"dtype": torch.bfloat16}], ids=IDS[:3] + ["bf16"]
)
def test_statistics_graphs_replay_each_refresh_slot_and_equal_the_eager_optimizer(case):
    """update_freq=2 with refresh_spread: the four matrices' statistics fall on two alternating slots, each its own
    graph (captured at its second sighting), gathering moving gradients by address and flagging a NaN inside."""
    graphed = _train(True, steps=30, **case)
    counts = graphed[1]._refresh_graphs.counts
    assert counts.captures >= 2 and counts.replays >= 8 and counts.refused == 0, counts
    _assert_same(graphed, _train(False, steps=30, **case))
    if case.get("nan_at", -1) >= 0:
        assert graphed[1].skipped_updates() == 1


def test_matrices_over_the_size_limit_are_updated_eagerly_beside_the_graph(monkeypatch):
    monkeypatch.setattr(graphed_update, "MAX_MEMBER_NUMEL", 96 * 96 - 1)  # the 96x96 group stays out
    graphed = _train(True)
    assert graphed[1]._graph_runner().counts.replays >= 10
    _assert_same(graphed, _train(False))


AUTO_CASES = [("q4shampoo", False), ("q4shampoo", True), ("q4adamw", False)]


@pytest.mark.parametrize("optimizer, gpu_busy", AUTO_CASES, ids=["host_bound", "gpu_bound", "q4adamw_host_bound"])
def test_auto_keeps_the_graph_only_where_it_makes_the_loop_faster(optimizer, gpu_busy):
    # a small model: the host's launches are the bound, so the replayed update is faster and "auto" keeps it;
    # with a long GPU kernel queued before every step the GPU sets the pace either way: the trial drops it
    torch.manual_seed(0)
    layers = [torch.nn.Linear(96, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(96, 70)).cuda()
    if optimizer == "q4adamw":
        opt = Q4AdamW(model.parameters(), lr=1e-2, min_quant_numel=1024)
    else:
        opt = Q4Shampoo(model.parameters(), lr=1e-2, update_freq=2, root_freq=4, min_quant_numel=1024)
    assert opt.config.cuda_graph == "auto"
    x, y = torch.randn(64, 96, device="cuda"), torch.randn(64, 70, device="cuda")
    trial = step_graph.GraphTrial
    for _ in range(trial.SKIP + 2 * trial.WINDOW + 20):
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        if gpu_busy:
            torch.cuda._sleep(100_000_000)  # tens of ms of GPU time, queued without the host waiting
        opt.step()
    torch.cuda.synchronize()
    info = opt.graph_info()
    assert info["kept"] is (not gpu_busy), info
    if gpu_busy:
        assert opt._graph_runner()._graph is None  # dropped, with its pool
        if optimizer == "q4shampoo":  # and the statistics graphs, which ran while the trial tried, with theirs
            refresh = opt._refresh_graphs
            assert refresh.counts.eager + refresh.counts.captures > 0, refresh.counts
            assert not refresh._graphs and refresh._pool is None
    else:
        assert info["graph_ms"] < info["eager_ms"] and info["replays"] >= 10, info


ADAMW_CASES = CASES + [{"variant": "factor"}, {"nan_at": 18, "variant": "factor"}]
ADAMW_IDS = IDS + ["factor", "factor_nan"]


@pytest.mark.parametrize("case", ADAMW_CASES, ids=ADAMW_IDS)
def test_q4adamw_graphed_step_equals_the_eager_optimizer(case, monkeypatch):
    if case.get("variant") != "factor":  # the factored v's row / column sums depend on the batch: whole groups
        monkeypatch.setattr(graphed_update, "CHUNK_NUMEL", 96 * 96)  # the 96x96 group in chunks of one member
    graphed = _train(True, optimizer="q4adamw", **case)
    counts = graphed[1]._graph_runner().counts
    if case.get("two_lrs"):  # two values of the lr scalar in one step: never captured
        assert counts.captures == 0 and counts.replays == 0
    else:
        assert counts.captures >= 1 and counts.replays >= 15 and counts.refused == 0, counts
    eager = _train(False, optimizer="q4adamw", **case)
    assert "_step_graph" not in eager[1].__dict__  # cuda_graph=False never made a runner
    _assert_same(graphed, eager)
    if case.get("nan_at", -1) >= 0:
        assert graphed[1].skipped_updates() == 1
