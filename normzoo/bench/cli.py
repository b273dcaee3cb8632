"""``normzoo bench``: time, bandwidth and saved memory of normzoo's layers next to torch.nn.

Examples::

    normzoo bench                                  # default layers, shapes, float32+bfloat16, both formats
    normzoo bench --quick                          # float32, 3 rounds: a smoke run
    normzoo bench --layers bn2d gn --shape 32x64x56x56 --dtypes float32 --formats channels_last
    normzoo bench --layers all --out bench-results --threads 2
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from normzoo.bench.environment import OMP_WAIT_CHOICES, set_omp_wait_policy


def _omp_wait_from(argv: Sequence[str]) -> Optional[str]:
    """Read ``--omp-wait`` before anything imports torch (the full parser needs torch for its help text)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--omp-wait", choices=OMP_WAIT_CHOICES)
    known, _ = pre.parse_known_args(list(argv))
    return known.omp_wait


def build_parser() -> argparse.ArgumentParser:
    from normzoo.bench import cases

    p = argparse.ArgumentParser(
        prog="normzoo bench",
        description="Time normzoo's normalization layers against torch.nn (or a straightforward implementation of "
                    "the paper's formula) in training (or eval) mode: median forward and forward+backward time, "
                    "effective GB/s against the traffic floor, the same machine's copy bandwidth, bytes saved for "
                    "backward. Writes a table, JSON and a PNG plot.",
        epilog=f"layers known to the benchmark: {', '.join(cases.known_layers())}; default: "
               f"{' '.join(cases.DEFAULT_LAYERS)}",
    )
    p.add_argument("--layers", nargs="+", metavar="NAME",
                   help="registry names, or 'all' for every registered layer the benchmark knows")
    p.add_argument("--shape", action="append", metavar="NxCxHxW", dest="shapes",
                   help="input shape, repeatable (default: 32x64x56x56, 8x256x14x14 and 8x512x768); image layers "
                        "take (N, C, *S) of their rank, ln/rms take (N, L, D)")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE", help="float32 bfloat16 float16 float64 (default: "
                                                                  "float32 bfloat16)")
    p.add_argument("--formats", nargs="+", metavar="FORMAT", help="contiguous channels_last (default: both)")
    p.add_argument("--threads", type=int, default=2, help="torch threads during the run (default: 2)")
    p.add_argument("--rounds", type=int, default=15, help="at most this many timed rounds per case (default: 15)")
    p.add_argument("--min-rounds", type=int, default=3, help="at least this many timed rounds (default: 3)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds after every contender's first call (default: 0)")
    p.add_argument("--budget", type=float, default=25.0,
                   help="seconds of timed rounds shared over all cases; 0 = always --rounds (default: 25)")
    p.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                   help="tuned: keep freed memory and avoid fresh mmap pages (glibc mallopt); default: leave it")
    p.add_argument("--omp-wait", choices=OMP_WAIT_CHOICES,
                   help="OpenMP wait policy, set before torch loads: passive (default unless OMP_WAIT_POLICY is "
                        "set; robust when other processes share the cores), active (spin), inherit (leave the "
                        "environment alone)")
    p.add_argument("--mode", choices=("train", "eval"), default="train",
                   help="train (default; the issue's targets) or eval: every module in eval mode after one training "
                        "forward on the input, its running statistics fixed")
    p.add_argument("--quick", action="store_true", help="smoke run: float32 only, <= 3 rounds, 5 s budget")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for results.json, results.txt, results.png (default: bench-results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        set_omp_wait_policy(_omp_wait_from(argv))
    except SystemExit as exc:  # a bad --omp-wait value: argparse has printed why
        return int(exc.code or 2)
    args = build_parser().parse_args(argv)
    from normzoo.bench import cases
    from normzoo.bench.runner import run

    try:
        shapes: Optional[List[tuple]] = [cases.parse_shape(s) for s in args.shapes] if args.shapes else None
        result = run(layers=args.layers, shapes=shapes, dtypes=args.dtypes, memory_formats=args.formats,
                     threads=args.threads, rounds=args.rounds, min_rounds=args.min_rounds, warmup=args.warmup,
                     budget_s=args.budget if args.budget > 0 else None, allocator=args.allocator, quick=args.quick,
                     seed=args.seed, progress=lambda line: print(line, file=sys.stderr, flush=True), mode=args.mode)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    paths = result.write(args.out, plot=not args.no_plot)
    print("\nwrote " + ", ".join(paths.values()))
    return 0 if result.rows and all(r.error is None for r in result.rows) else 1


__all__ = ["build_parser", "main"]
