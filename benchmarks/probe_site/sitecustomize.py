"""Applies ``benchmarks/three_bit_probe.py``'s patch named by ``THREE_BIT_PROBE`` in every Python process started
with this folder on ``PYTHONPATH`` (so child processes of a benchmark get it too). Not for anything but that probe."""

import os
import sys
from pathlib import Path

if os.environ.get("THREE_BIT_PROBE"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import three_bit_probe

    three_bit_probe.apply(os.environ["THREE_BIT_PROBE"])
    print(f"[three_bit_probe] {os.environ['THREE_BIT_PROBE']} applied in pid {os.getpid()}", file=sys.stderr)
