"""``q4shampoo run`` / ``python -m hf_q4shampoo.launcher`` (issue #3, item 2)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest

from hf_q4shampoo import cli, launcher

from tiny_hf import FAST, one_torch_thread  # noqa: F401 (autouse fixture)

SCRIPT = os.path.join(os.path.dirname(__file__), "fixtures", "train_tiny_clm.py")
TRAIN = [
    "--optim",
    "q4shampoo",
    "--optim_args",
    FAST,
    "--max_steps",
    "4",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "8",
    "--disable_tqdm",
    "true",
]


def _env(**extra):
    # HF_Q4SHAMPOO_AUTO_REGISTER=0: `import hf_q4shampoo` alone would register; the launcher must do it itself
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_Q4SHAMPOO_AUTO_REGISTER": "0", **extra}


def _result(folder, name="result.json"):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _check_trained(result):
    assert result["name"] == "__main__" and result["optim"] == "q4shampoo" and result["optimizer"] == "Q4Shampoo"
    assert len(result["losses"]) == 4 and all(math.isfinite(x) for x in result["losses"])


@pytest.mark.heavy
def test_unmodified_script_needs_the_launcher(tmp_path):
    out = str(tmp_path / "out")
    plain = subprocess.run(
        [sys.executable, SCRIPT, "--output_dir", out, *TRAIN], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert plain.returncode == 2 and "invalid choice: 'q4shampoo'" in plain.stderr
    launched = subprocess.run(
        [sys.executable, "-m", "hf_q4shampoo.cli", "run", SCRIPT, "--output_dir", out, *TRAIN],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = _result(out)
    _check_trained(result)
    assert result["argv0"] == SCRIPT


def test_in_process_with_json_config_restores_sys_state(tmp_path):
    keys = TRAIN[0::2]
    config = {k.lstrip("-"): v for k, v in zip(keys, TRAIN[1::2])}
    config.update(output_dir=str(tmp_path), max_steps=4, use_cpu=True, per_device_train_batch_size=8, logging_steps=1)
    path = tmp_path / "args.json"
    path.write_text(json.dumps(config))
    argv, path_before = sys.argv[:], sys.path[:]
    assert cli.main(["run", SCRIPT, str(path)]) == 0
    assert sys.argv == argv and sys.path == path_before
    _check_trained(_result(tmp_path))


@pytest.mark.parametrize(
    "body,status",
    [
        ("pass", 0),
        ("raise SystemExit(3)", 3),
        ("import sys; sys.exit('failed: reason')", 1),
        ("import argparse; argparse.ArgumentParser().parse_args()", 2),  # unknown argument "--x" below
    ],
)
def test_exit_status_is_the_scripts(tmp_path, body, status, capsys):
    script = tmp_path / "job.py"
    script.write_text(body + "\n")
    assert launcher.main([str(script), "--x"]) == status
    if status == 1:
        assert "failed: reason" in capsys.readouterr().err


def test_main_semantics_and_module_form(tmp_path, monkeypatch):
    (tmp_path / "helper_mod_q4.py").write_text("VALUE = 'sibling import works'\n")
    report = tmp_path / "seen.json"
    code = (
        "import json, sys\n"
        "from helper_mod_q4 import VALUE\n"
        "from transformers.training_args import OptimizerNames\n"
        "if __name__ == '__main__':\n"
        "    seen = {'argv': sys.argv, 'value': VALUE, 'q4': OptimizerNames('q4shampoo').value}\n"
        f"    json.dump(seen, open({str(report)!r}, 'w'))\n"
    )
    (tmp_path / "job_q4.py").write_text(code)
    assert launcher.main([str(tmp_path / "job_q4.py"), "a", "--b"]) == 0
    seen = json.loads(report.read_text())
    assert seen == {
        "argv": [str(tmp_path / "job_q4.py"), "a", "--b"],
        "value": "sibling import works",
        "q4": "q4shampoo",
    }

    monkeypatch.chdir(tmp_path)  # `-m` resolves modules from the current directory, as `python -m` does
    report.unlink()
    assert launcher.main(["-m", "job_q4", "c"]) == 0
    seen = json.loads(report.read_text())
    assert seen["argv"] == [str(tmp_path / "job_q4.py"), "c"]
    sys.modules.pop("helper_mod_q4", None)


@pytest.mark.parametrize(
    "optim_args,fragment",
    [
        ("update_freq", "'update_freq' is not of the form key=value"),
        ("update_freq=10,update_freq=20", "'update_freq' is given twice"),
        ("quant_block_size=1000000000", "quant_block_size must be an integer in [2, 4096]"),
        ("blocksize=64", "unknown optim_args key 'blocksize'. Allowed keys:"),
    ],
)
def test_bad_optim_args_stop_the_launched_script_at_argument_parsing(tmp_path, capsys, optim_args, fragment):
    # a script shaped like transformers' examples: it marks the moment its arguments are parsed
    marker = tmp_path / "parsed"
    script = tmp_path / "job_args.py"
    script.write_text(
        "from transformers import HfArgumentParser, TrainingArguments\n"
        "(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()\n"
        f"open({str(marker)!r}, 'w').close()\n"
    )
    # through the console script's dispatcher (`q4shampoo run`), which hands over to the launcher
    status = cli.main(
        [
            "run",
            str(script),
            "--output_dir",
            str(tmp_path),
            "--optim",
            "q4shampoo",
            "--optim_args",
            optim_args,
            "--use_cpu",
            "true",
            "--report_to",
            "none",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2 and not marker.exists()
    assert len(err.splitlines()) == 1 and err.startswith("q4shampoo run: error: Q4Shampoo:") and fragment in err, err


def test_usage_errors(tmp_path, capsys):
    assert launcher.main([]) == 2
    assert launcher.main(["--help"]) == 0 and "torchrun" in capsys.readouterr().out
    assert launcher.main([str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    assert launcher.main(["-m"]) == 2


@pytest.mark.heavy
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_ddp_two_cpu_processes(tmp_path):
    # DDP on two CPU processes (gloo): every rank runs the launcher, the preconditioner work is split, ranks agree
    out = str(tmp_path)
    command = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hf_q4shampoo.launcher",
        SCRIPT,
        "--output_dir",
        out,
        *TRAIN[:-4],
        "--per_device_train_batch_size",
        "4",
        "--disable_tqdm",
        "true",
    ]
    # own process group, so a hang cannot leave the two ranks behind
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    ranks = [_result(out, f"result-rank{r}.json") for r in (0, 1)]
    for result in ranks:
        _check_trained(result)
        assert result["world_size"] == 2
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]
