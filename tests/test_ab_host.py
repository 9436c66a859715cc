"""benchmarks/ab_host.py: the interleaved run order and the summary (the runs themselves need a GPU)."""

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ab_host.py"
_spec = importlib.util.spec_from_file_location("ab_host", SCRIPT)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)


def test_runs_alternate_in_abba_order():
    assert ab.run_order(1) == ["old", "new"]
    assert ab.run_order(3) == ["old", "new", "new", "old", "old", "new"]


def _run(tree, step, pace, rng):
    forward = 15.0 * pace * rng.uniform(0.99, 1.01)
    backward = 20.0 * pace * rng.uniform(0.99, 1.01)
    return {"tree": tree, "step_host_ms": step * pace, "forward_host_ms": forward, "backward_host_ms": backward}


def test_summary_separates_a_change_from_the_machines_pace(tmp_path):
    # the new tree saves 1 ms at equal pace, but its runs happen while the machine runs 8% slower: the raw
    # difference says it got slower, the pace-corrected one finds the saving
    rng = random.Random(7)
    runs = [_run("old", 25.0, 1.0, rng) for _ in range(2)] + [_run("new", 24.0, 1.08, rng) for _ in range(2)]
    s = ab.summarize(runs)
    assert s["new_minus_old_ms"] > 0.5
    assert s["new_minus_old_ms_at_equal_pace"] == pytest.approx(-1.0, abs=0.15)
    assert s["old"]["runs"] == 2 and s["new"]["runs"] == 2
    for i, r in enumerate(runs):
        (tmp_path / f"run{i:02d}_{r['tree']}.json").write_text(json.dumps(r))
    out = subprocess.run([sys.executable, str(SCRIPT), "--summarize", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["new_minus_old_ms_at_equal_pace"] == pytest.approx(
        s["new_minus_old_ms_at_equal_pace"]
    )


def test_one_tree_alone_has_no_difference():
    rng = random.Random(3)
    s = ab.summarize([_run("new", 20.0, 1.0, rng)])
    assert "new" in s and "old" not in s and "new_minus_old_ms" not in s


def test_the_old_tree_is_the_package_at_that_commit(tmp_path):
    ab._old_tree("HEAD", tmp_path)
    assert (tmp_path / "hf_q4shampoo" / "__init__.py").is_file()
    assert (tmp_path / "hf_q4shampoo" / "layout.py").read_bytes() == subprocess.run(
        ["git", "show", "HEAD:hf_q4shampoo/layout.py"], cwd=SCRIPT.parent.parent, capture_output=True, check=True
    ).stdout


def test_the_old_tree_may_be_a_folder_made_beforehand(tmp_path):
    made = tmp_path / "old"
    ab._old_tree("HEAD", made.mkdir() or made)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert ab.old_package_root(str(made), scratch) == made.resolve()
    assert not any(scratch.iterdir())  # nothing archived: the folder was used as it is
    assert ab.old_package_root("HEAD", scratch) == scratch and (scratch / "hf_q4shampoo").is_dir()
