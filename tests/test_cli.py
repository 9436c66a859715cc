"""The ``q4shampoo`` console script answers help and argument errors without importing torch (issue 13)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# what pip writes as the console script (its name is what lets the package skip its eager imports)
CONSOLE_SCRIPT = """\
import sys
from hf_q4shampoo.cli import main
try:
    code = main()
finally:  # argparse's --help exits through SystemExit
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture()
def q4shampoo(tmp_path):
    script = tmp_path / "q4shampoo"
    script.write_text(CONSOLE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
        )

    return run


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--help"], 0, "usage: q4shampoo {run,memory,bench}"),
        (["run", "missing.py"], 2, "q4shampoo run: no such script: 'missing.py'"),
        (["run", "-m", "no_such_module"], 1, "q4shampoo run: no module named 'no_such_module'"),
        (["memory", "--help"], 0, "usage: q4shampoo memory"),
        (["bench", "--help"], 0, "usage: q4shampoo bench"),
        (["nope"], 2, "unknown subcommand 'nope'"),
    ],
)
def test_help_and_errors_answer_without_torch(q4shampoo, args, code, expected):
    proc = q4shampoo(*args)
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert "torch imported: False" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_package_names_load_on_first_access_in_the_console_script(q4shampoo, tmp_path):
    (tmp_path / "job.py").write_text(
        "import sys\nfrom hf_q4shampoo import Q4Shampoo, register\n"
        "from transformers.training_args import OptimizerNames\n"
        "print('registered:', 'q4shampoo' in {m.value for m in OptimizerNames}, Q4Shampoo.__name__)\n"
    )
    proc = q4shampoo("run", "job.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered: True Q4Shampoo" in proc.stdout
