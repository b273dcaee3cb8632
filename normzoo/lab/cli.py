"""``normzoo lab``: run the experiments and write the report.

    normzoo lab                         every experiment, quick, into ./normzoo-lab/
    normzoo lab list                    the experiments, their findings and whether they can run now
    normzoo lab run NAME... [--full] [--seed N] [--out DIR] [--workers N] [--fresh]
    normzoo lab report DIR              rebuild DIR/index.html and the figures from DIR/results.json

Running into a folder that already holds results resumes: experiments finished with the same settings are
kept. ``--scale`` (or ``NORMZOO_LAB_SCALE``) shrinks every step count, for smoke tests only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

DEFAULT_OUT = "normzoo-lab"


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _run_parser(prog: str, names: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run lab experiments and write the report "
                                "(results.json, figures/*.png, index.html).")
    if names:
        p.add_argument("names", nargs="+", metavar="NAME", help="experiment names ('all' for every one; see 'list')")
    p.add_argument("--full", action="store_true", help="the full versions (each within ~10 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); results are deterministic per seed")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default ./{DEFAULT_OUT})")
    p.add_argument("--workers", type=int, default=_default_workers(),
                   help="processes for the independent runs of a sweep (default: min(2, CPUs))")
    p.add_argument("--fresh", action="store_true", help="run again even experiments already finished in --out")
    p.add_argument("--scale", type=float, default=None, help="shrink step counts by this factor in (0, 1] (smoke tests)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _cmd_run(args: argparse.Namespace, names: List[str]) -> int:
    from .experiments import ORDER
    from .runner import Progress, run_experiments

    if names == ["all"]:
        names = list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        print(f"normzoo lab: unknown experiment(s) {', '.join(unknown)}; expected: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("normzoo lab: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.scale is not None and not 0 < args.scale <= 1:
        print(f"normzoo lab: --scale must be in (0, 1], got {args.scale}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    progress = Progress(enabled=not args.quiet)
    try:
        results = run_experiments(names, args.out, quick=not args.full, seed=args.seed, scale=args.scale,
                                  workers=args.workers, fresh=args.fresh, progress=progress)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"normzoo lab: {exc}", file=sys.stderr)
        return 2
    width = max(len(n) for n in names)
    print(f"\nnormzoo lab: {len(names)} experiment(s) in {time.monotonic() - t0:.0f} s")
    for n in names:
        r = results[n]
        print(f"  {n:<{width}}  {r.verdict:<15} {r.reason if r.verdict in ('pending', 'error') else ''}".rstrip())
    print(f"report: {os.path.join(args.out, 'index.html')}")
    return 1 if any(results[n].verdict == "error" for n in names) else 0


def _cmd_list() -> int:
    from .experiments import all_experiments
    from .models import missing

    for name, exp in all_experiments().items():
        need = missing(exp.requires)
        status = f"pending (needs {', '.join(need)})" if need else "runnable"
        print(f"{name:<16} {status}\n    {exp.title}\n    finding: {exp.finding}\n")
    return 0


def _cmd_report(argv: Sequence[str]) -> int:
    from .report import rebuild
    from .runner import CorruptResults

    p = argparse.ArgumentParser(prog="normzoo lab report", description="Rebuild the HTML page and figures of a "
                                "report folder from its results.json.")
    p.add_argument("dir", help="a report folder written by 'normzoo lab run'")
    args = p.parse_args(list(argv))
    try:
        path = rebuild(args.dir)
    except (CorruptResults, FileNotFoundError) as exc:
        print(f"normzoo lab report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``normzoo lab``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not args or args[0].startswith("-"):
        ns = _run_parser("normzoo lab", names=False).parse_args(args)
        return _cmd_run(ns, ["all"])
    cmd, rest = args[0], args[1:]
    if cmd == "list":
        return _cmd_list()
    if cmd == "run":
        ns = _run_parser("normzoo lab run", names=True).parse_args(rest)
        return _cmd_run(ns, list(ns.names))
    if cmd == "report":
        return _cmd_report(rest)
    print(f"normzoo lab: unknown command {cmd!r}; expected list, run or report (or no command to run everything)\n",
          file=sys.stderr)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
