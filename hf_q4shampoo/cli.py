"""The ``q4shampoo`` console script.

    q4shampoo run SCRIPT.py [ARGS]     run an unmodified training script with --optim q4shampoo available
    q4shampoo memory MODEL [ARGS]      pre-flight estimate of optimizer-state memory for a model
    q4shampoo bench [ARGS]             speed / memory benchmark against AdamW and peers

Each subcommand lives in its own module with a ``main(argv)`` function; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "run": ("hf_q4shampoo.launcher", "run a training script with `--optim q4shampoo` registered"),
    "memory": ("hf_q4shampoo.estimate_cli", "estimate optimizer-state memory for a model or config"),
    "bench": ("hf_q4shampoo.bench", "benchmark step time and memory against AdamW and peers"),
}

#: subcommands whose arguments are parsed by a module lighter than the subcommand (for a fast --help)
HELP_MODULES = {"bench": "hf_q4shampoo.bench_cli"}


def _usage() -> str:
    lines = ["usage: q4shampoo {" + ",".join(SUBCOMMANDS) + "} [ARGS...]", ""]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`q4shampoo SUBCOMMAND --help` describes each one."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"q4shampoo: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in HELP_MODULES and any(a in ("-h", "--help") for a in rest):
        # answer --help from the arguments module alone (the subcommand itself imports torch: seconds)
        importlib.import_module(HELP_MODULES[name]).parse_args(rest)
        return 0
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
