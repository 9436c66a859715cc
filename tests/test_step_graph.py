"""step_graph's rule (capture a key seen twice in a row, or three times when a new key has an ordinary form;
replay it; refuse what cannot be captured), checked with a stand-in for torch's CUDA graph so that it runs
anywhere; tests/test_cuda_graph.py runs the real thing."""

import contextlib

import pytest
import torch

from hf_q4shampoo import step_graph
from hf_q4shampoo.capture_guard import NotCapturable


class _Graph:
    replayed = 0

    def replay(self):
        _Graph.replayed += 1


@pytest.fixture
def fake_cuda_graph(monkeypatch):
    capturing = []

    @contextlib.contextmanager
    def graph(g, capture_error_mode, pool=None):
        capturing.append(g)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    _Graph.replayed = 0
    return capturing


def test_a_key_is_captured_the_second_time_in_a_row_and_replayed_after(fake_cuda_graph):
    runner, ran, prepared = step_graph.StepGraph(), [], []
    for key in ["a", "a", "a", "a", "b", "a", "a"]:
        runner.run(key, lambda k=key: ran.append(k), lambda k=key: prepared.append(k))
    counts = runner.counts
    # a: eager, capture (its work runs once while recorded, then the graph replays), replay, replay;
    # b: eager (new key, not captured after one sighting); a: the graph kept for a replays at once
    assert (counts.eager, counts.captures, counts.replays) == (2, 1, 4)
    assert ran == ["a", "a", "b"]  # the eager runs and the recorded one
    assert _Graph.replayed == 1 + 4
    assert len(fake_cuda_graph) == 1
    assert len(prepared) == 7  # before every run with a key: the eager ones read the same device tables


def test_with_an_ordinary_form_a_new_key_runs_it_and_the_third_sighting_is_captured(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []
    keys = ["a", "b", "c", "c", "c", "c", "d", "c", "c"]
    for key in keys:
        runner.run(key, lambda k=key: ran.append(("graph form", k)), lambda: None, ordinary=lambda k=key: ran.append(k))
    counts = runner.counts
    # a, b, c: new keys run the ordinary update; c again: the graph's form eagerly (warms its caches); c a third
    # time: captured; then replayed; d: ordinary; c: the kept graph replays at once
    assert ran == ["a", "b", "c", ("graph form", "c"), ("graph form", "c"), "d"]
    assert (counts.ordinary, counts.eager, counts.captures, counts.replays) == (4, 1, 1, 3)
    assert _Graph.replayed == 1 + 3


def test_a_refused_key_runs_its_ordinary_form(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []

    def work():
        if fake_cuda_graph:
            ran.append("refused")
            fake_cuda_graph.clear()
            raise NotCapturable("a new index")
        ran.append("graph form")

    for _ in range(5):
        runner.run("k", work, lambda: None, ordinary=lambda: ran.append("ordinary"))
    assert ran == ["ordinary", "graph form", "refused", "graph form", "ordinary", "ordinary"]
    assert (runner.counts.ordinary, runner.counts.eager, runner.counts.refused) == (
        3,
        1,
        1,
    )  # as refused: not counted eager


def test_no_key_always_runs_eagerly(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []
    for _ in range(4):
        runner.run(None, lambda: ran.append(1), lambda: pytest.fail("prepared an eager step"))
    assert len(ran) == 4 and runner.counts.eager == 4 and not fake_cuda_graph


def test_a_refused_capture_runs_the_step_eagerly_and_is_not_tried_again(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []

    def work():
        if fake_cuda_graph and len(ran) == 1:  # inside the first capture: something needs the host
            ran.append("refused")
            raise NotCapturable("a new index")
        ran.append("ran")

    for _ in range(4):
        runner.run("k", work, lambda: None)
    assert ran == ["ran", "refused", "ran", "ran", "ran"]
    assert (runner.counts.eager, runner.counts.captures, runner.counts.refused) == (3, 0, 1)
    assert len(fake_cuda_graph) == 1


def test_an_unexpected_capture_failure_warns_and_stops_capturing(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []

    def work():
        if len(fake_cuda_graph) == 1 and len(ran) == 1:
            ran.append("failed")
            raise RuntimeError("operation not permitted when stream is capturing")
        ran.append("ran")

    with pytest.warns(RuntimeWarning, match="eagerly from now on"):
        for key in ["k", "k", "j", "j", "j"]:
            runner.run(key, work, lambda: None)
    assert ran == ["ran", "failed", "ran", "ran", "ran", "ran"] and runner.disabled
    assert len(fake_cuda_graph) == 1


def test_keyed_graphs_capture_a_recurring_key_at_its_second_sighting_and_replay_it_after(fake_cuda_graph):
    """Refresh slots come back every few steps, not on consecutive ones: each key keeps its own graph."""
    runner, ran, prepared = step_graph.KeyedGraphs(), [], []
    replays = [runner.run(k, lambda k=k: ran.append(k), lambda k=k: prepared.append(k)) for k in "ababcab"]
    # a, b: first sightings eager (they fill the host-side caches); a, b again: captured (the work runs once
    # while recorded, then replays); c: eager; a, b: replayed
    assert ran == ["a", "b", "a", "b", "c"]
    assert replays == [False, False, False, False, False, True, True]
    assert (runner.counts.eager, runner.counts.captures, runner.counts.replays) == (3, 2, 2)
    assert _Graph.replayed == 2 + 2 and len(fake_cuda_graph) == 2
    assert prepared == list("ababcab")  # before every keyed run, eager ones included
    runner.run(None, lambda: ran.append("none"), lambda: pytest.fail("prepared an unkeyed run"))
    assert ran[-1] == "none"
    runner.release()  # the graphs and the sightings go: a is new again
    runner.run("a", lambda: ran.append("a"), lambda: None)
    assert ran[-1] == "a" and runner.counts.replays == 2


def test_keyed_graphs_keep_the_most_recently_used_and_never_retry_a_refused_key(fake_cuda_graph, monkeypatch):
    monkeypatch.setattr(step_graph.KeyedGraphs, "MAX_GRAPHS", 2)
    runner, ran = step_graph.KeyedGraphs(), []
    for k in "aabbacc":  # a and b captured; a replayed (most recent); c captured: b, the least recent, goes
        runner.run(k, lambda k=k: ran.append(k), lambda: None)
    assert (runner.counts.captures, runner.counts.replays) == (3, 1)
    assert runner.run("a", lambda: ran.append("a"), lambda: None)  # kept
    assert not runner.run("b", lambda: ran.append("b"), lambda: None) and ran[-1] == "b"  # evicted: captured again
    assert runner.counts.captures == 4

    def refuse():
        if len(fake_cuda_graph) > 4:  # inside the capture of "r": something needs the host
            fake_cuda_graph.clear()
            raise NotCapturable("a new index")
        ran.append("r")

    for _ in range(4):
        runner.run("r", refuse, lambda: None)
    assert ran[-4:] == ["r"] * 4 and runner.counts.refused == 1 and runner.counts.captures == 4


class _Mark:
    """A stand-in for a timing event: recorded at a known time (ms)."""

    def __init__(self, ms: float):
        self.ms = ms

    def synchronize(self):
        pass

    def elapsed_time(self, later: "_Mark") -> float:
        return later.ms - self.ms


def _trial(eager_ms: float, graph_ms: float, replay_from: int = 0, steps: int = 120):
    """Feed a GraphTrial step periods: ``eager_ms`` while it runs eagerly, ``graph_ms`` once it tries the graph
    and the update replays (from ``replay_from`` steps after it started trying)."""
    trial, now, decisions, tried = step_graph.GraphTrial(), 0.0, [], 0
    replayed = False
    for _ in range(steps):
        decisions.append(trial.enter(_Mark(now), replayed))
        tried = tried + 1 if trial.trying else tried
        replayed = trial.trying and tried > replay_from
        now += graph_ms if replayed else eager_ms
    return trial, decisions


def test_the_graph_trial_keeps_the_graph_only_when_it_is_faster():
    kept, decisions = _trial(eager_ms=60.0, graph_ms=52.0)
    assert kept.decision is True and kept.trying
    assert (kept.eager_ms, kept.graph_ms) == (60.0, 52.0)
    first = decisions.index(True)
    assert decisions[:first] == [None] * first and set(decisions[first:]) == {True}
    # entries 1..SKIP+1 give no period; the next WINDOW are eager, the WINDOW after them replayed
    assert first + 1 == step_graph.GraphTrial.SKIP + 1 + 2 * step_graph.GraphTrial.WINDOW
    dropped, _ = _trial(eager_ms=60.0, graph_ms=59.0)  # within the 3% margin: not worth a graph's pool
    assert dropped.decision is False and not dropped.trying
    slower, _ = _trial(eager_ms=60.0, graph_ms=63.0)
    assert slower.decision is False


def test_the_graph_trial_counts_only_replayed_steps_and_gives_up_without_replays():
    late, _ = _trial(eager_ms=60.0, graph_ms=40.0, replay_from=30)  # keys changing: replays start late
    assert late.decision is True and late.graph_ms == 40.0
    never, decisions = _trial(eager_ms=60.0, graph_ms=40.0, replay_from=10**6)
    assert never.decision is False and never.graph_ms is None
    trial = step_graph.GraphTrial
    assert decisions.count(None) == trial.SKIP + 1 + trial.WINDOW + trial.PATIENCE


def test_graph_info_is_none_off_cuda_and_the_trial_is_logged_in_words():
    from hf_q4shampoo import Q4Shampoo
    from hf_q4shampoo.graphed_update import _trial_words

    p = torch.nn.Parameter(torch.randn(16, 12))
    opt = Q4Shampoo([p], lr=1e-3)
    p.grad = torch.randn(16, 12)
    opt.step()
    assert opt.config.cuda_graph == "auto" and opt.graph_info() is None  # no trial off CUDA
    kept, _ = _trial(eager_ms=60.0, graph_ms=52.0)
    assert _trial_words(kept) == ("kept", "median step 60.0 ms eager, 52.0 ms replayed")
    never, _ = _trial(eager_ms=60.0, graph_ms=40.0, replay_from=10**6)
    assert _trial_words(never) == ("dropped", "no replayed steps to time")
