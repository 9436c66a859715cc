"""What every CPU benchmark's JSON result records about how it was made: the command, the machine and the date
(STYLE: every figure comes with the command, machine and date that produced it)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def provenance() -> dict[str, str]:
    """``command`` (this process's command line), ``machine`` (CPU, torch threads, torch version) and ``date``."""
    return {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }


def write_result(path: str | Path, **payload: Any) -> None:
    """Write ``provenance()`` and ``payload`` as indented JSON to ``path`` (its folder created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance(), **payload}, indent=1))
