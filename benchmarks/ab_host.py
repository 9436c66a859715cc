"""Host time of ``optimizer.step()`` at an older commit against this tree, runs interleaved (GPU).

    python benchmarks/ab_host.py --old REV|FOLDER [--pairs 2] [--out DIR] -- [host_profile.py arguments]
    python benchmarks/ab_host.py --summarize DIR

Why: a change that saves a millisecond of host time per step is smaller than the drift between processes on a
shared machine (docs/perf_notes.md v25: the forward and backward, which no optimizer change touches, moved by
0.9-2.5 ms between processes). So the two trees run in ABBA order (old, new, new, old, ...), which cancels a
linear drift, and each run's ``step()`` host time is also given as a share of its own forward + backward host time,
which the machine's pace moves but an optimizer change does not.

Each run is ``benchmarks/host_profile.py --plain`` in a fresh process, the old tree's package taken from
``git archive REV hf_q4shampoo`` into a temporary folder placed first on ``PYTHONPATH``. Where the machine has
no git history (the device tool sends a copy of the working tree), ``--old`` names a folder that holds the old
``hf_q4shampoo/`` instead: make it here with ``mkdir OLD && git archive REV hf_q4shampoo | tar -x -C OLD``, in a
folder git ignores, and carry it. Writes ``DIR/RUN.json``
per run and prints the summary (also ``DIR/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_order(pairs: int) -> list[str]:
    """ABBA order of ``pairs`` old / new pairs: old new new old old new ..."""
    out = []
    for i in range(pairs):
        out += ["old", "new"] if i % 2 == 0 else ["new", "old"]
    return out


def summarize(runs: list[dict]) -> dict:
    """Per tree: mean ``step()`` host ms and its share of forward + backward host time; new minus old for both."""
    out: dict = {}
    for tree in ("old", "new"):
        mine = [r for r in runs if r["tree"] == tree]
        if not mine:
            continue
        out[tree] = {
            "runs": len(mine),
            "step_host_ms": statistics.fmean(r["step_host_ms"] for r in mine),
            "step_share": statistics.fmean(
                r["step_host_ms"] / (r["forward_host_ms"] + r["backward_host_ms"]) for r in mine
            ),
            "forward_backward_host_ms": statistics.fmean(r["forward_host_ms"] + r["backward_host_ms"] for r in mine),
        }
    if "old" in out and "new" in out:
        old, new = out["old"], out["new"]
        out["new_minus_old_ms"] = new["step_host_ms"] - old["step_host_ms"]
        # the share, in ms at the old runs' forward + backward pace: what the change did with the machine's pace fixed
        out["new_minus_old_ms_at_equal_pace"] = (new["step_share"] - old["step_share"]) * old[
            "forward_backward_host_ms"
        ]
    return out


def _old_tree(rev: str, folder: Path) -> None:
    archive = subprocess.run(["git", "archive", rev, "hf_q4shampoo"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)


def old_package_root(old: str, scratch: Path) -> Path:
    """The folder to put first on ``PYTHONPATH`` for the old tree: ``old`` itself when it holds ``hf_q4shampoo/``,
    else ``scratch`` filled from ``git archive old``."""
    given = Path(old)
    if (given / "hf_q4shampoo").is_dir():
        return given.resolve()
    _old_tree(old, scratch)
    return scratch


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser()
    p.add_argument("--old", help="the commit to compare this tree against, or a folder holding its hf_q4shampoo/")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--out", default="ab_host_out")
    p.add_argument("--summarize", default=None, help="only summarize the runs already in this folder")
    args = p.parse_args(argv)
    if args.summarize:
        runs = [json.loads(f.read_text()) for f in sorted(Path(args.summarize).glob("run*.json"))]
        print(json.dumps(summarize(runs), indent=1))
        return
    if not args.old:
        raise SystemExit("--old REV is needed (or --summarize DIR)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        old_root = str(old_package_root(args.old, Path(scratch)))
        for i, tree in enumerate(run_order(args.pairs)):
            path = out / f"run{i:02d}_{tree}.json"
            first = old_root if tree == "old" else str(ROOT)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([first, str(ROOT)])}
            cmd = [sys.executable, str(ROOT / "benchmarks" / "host_profile.py"), "--plain", "--json", str(path)]
            subprocess.run(cmd + extra, env=env, check=True, stdout=subprocess.DEVNULL)
            result = json.loads(path.read_text()) | {"tree": tree, "rev": args.old if tree == "old" else "HEAD"}
            path.write_text(json.dumps(result, indent=1))
            runs.append(result)
            print(tree, f"step {result['step_host_ms']:.2f} ms host", flush=True)
    summary = summarize(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
