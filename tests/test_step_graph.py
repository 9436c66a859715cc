"""step_graph's rule (a key's first run is the plain eager update; the second runs the graph's form eagerly and is
captured; later ones replay; what cannot be captured stays eager), checked with a stand-in for torch's CUDA graph
so that it runs anywhere; tests/test_cuda_graph.py runs the real thing."""

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
    def graph(g, capture_error_mode):
        capturing.append(g)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    _Graph.replayed = 0
    return capturing


def _run(runner, keys, log):
    for key in keys:
        runner.run(
            key,
            lambda k=key: log.append(("work", k)),
            lambda k=key: log.append(("prepare", k)),
            lambda k=key: log.append(("plain", k)),
        )


def test_a_key_runs_plain_then_is_captured_after_an_eager_run_then_replays(fake_cuda_graph):
    runner, log = step_graph.StepGraph(), []
    _run(runner, ["a", "a", "a", "a", "b", "a", "a"], log)
    ran = [entry for entry in log if entry[0] != "prepare"]
    # a: plain; work (this step's update) + work (recorded by the capture); replay; replay;
    # b: plain (a new key); a: the graph kept for a replays at once
    assert ran == [("plain", "a"), ("work", "a"), ("work", "a"), ("plain", "b")]
    assert (runner.counts.eager, runner.counts.captures, runner.counts.replays) == (3, 1, 4)
    assert _Graph.replayed == 4  # the capture itself is not replayed: its step's update already ran
    assert len(fake_cuda_graph) == 1
    assert sum(entry[0] == "prepare" for entry in log) == 7  # before every run with a key


def test_no_key_always_runs_the_plain_update(fake_cuda_graph):
    runner, log = step_graph.StepGraph(), []
    _run(runner, [None] * 4, log)
    assert log == [("plain", None)] * 4 and runner.counts.eager == 4 and not fake_cuda_graph


def test_a_refused_capture_keeps_the_key_eager(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []

    def work():
        ran.append("work")
        if fake_cuda_graph:  # inside the capture: something needs the host
            raise NotCapturable("a new index")

    for _ in range(4):
        runner.run("k", work, lambda: None, lambda: ran.append("plain"))
    # plain; work (the update) + the refused capture's partial recording; then plain for good
    assert ran == ["plain", "work", "work", "plain", "plain"]
    assert (runner.counts.captures, runner.counts.refused, runner.counts.replays) == (0, 1, 0)
    assert len(fake_cuda_graph) == 1


def test_an_unexpected_capture_failure_warns_and_stops_capturing(fake_cuda_graph):
    runner, ran = step_graph.StepGraph(), []

    def work():
        ran.append("work")
        if fake_cuda_graph and len(ran) == 3:
            raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="eagerly from now on"):
        for key in ["k", "k", "j", "j", "j"]:
            runner.run(key, work, lambda: None, lambda: ran.append("plain"))
    assert ran == ["plain", "work", "work", "plain", "plain", "plain"] and runner.disabled
    assert len(fake_cuda_graph) == 1
