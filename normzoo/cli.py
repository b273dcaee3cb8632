"""The ``normzoo`` command: ``normzoo lab ...`` and ``normzoo bench ...``.

Each subcommand lives in its own package (:mod:`normzoo.lab`, :mod:`normzoo.bench`) and exposes
``main(argv) -> int``; this module only dispatches, so importing it stays cheap.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

_COMMANDS = {
    "lab": ("normzoo.lab.cli", "reproduce what the seeds and papers claim; writes an HTML report"),
    "bench": ("normzoo.bench.cli", "time, bandwidth and saved memory of every layer next to torch.nn"),
}


def _usage() -> str:
    lines = ["usage: normzoo <command> [options]", "", "commands:"]
    lines += [f"  {name:<7}{help_}" for name, (_, help_) in _COMMANDS.items()]
    lines.append("\n'normzoo <command> --help' for a command's options.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from normzoo import __version__

        print(f"normzoo {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in _COMMANDS:
        print(f"normzoo: unknown command {name!r}; expected one of {sorted(_COMMANDS)}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
