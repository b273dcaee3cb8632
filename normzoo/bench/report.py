"""Render a :class:`~normzoo.bench.runner.BenchResult`: a plain-text table, a JSON file and a PNG plot.

Table columns (times are medians in milliseconds; every figure of a row comes from the same rounds):

``fwd``/``f+b``       normzoo forward and forward+backward time
``base f+b``          the baseline's forward+backward time (torch.nn layer or paper formula, see the legend)
``speedup``           baseline / normzoo, forward+backward
``GB/s``              5 x tensor bytes / normzoo forward+backward time
``copy``              copy bandwidth at the same size (GB/s); ``%copy``: GB/s as a fraction of it
``saved``             bytes saved for backward (parameters excluded) in units of one input tensor
``vsBN``              time / normzoo BatchNorm's (BatchNorm family)
``bf16/32``           bfloat16 time / float32 time (per element)
``busy``              cores other processes kept busy while this row's rounds ran (noise indicator)
``targets``           ``ok``, or the targets missed; a value that misses its target ends with ``!``; a missed
                      speedup says what fraction of the copy bandwidth meeting it would take, where over 100%;
                      a missed speedup or copy target says the same where it is over 100% only in the time
                      left after the fixed cost of an autograd step (timed as an op that does no work)

A ``~`` after the shape marks a case whose input and output fit in the last-level cache together: its
bandwidth is the cache's, not memory's (compare it with the copy column, also cache-resident).
"""
from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

from normzoo.bench.results import Row
from normzoo.bench.targets import Check, checks, summary

if TYPE_CHECKING:  # pragma: no cover
    from normzoo.bench.runner import BenchResult

_DT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
_FMT = {"contiguous": "contig", "channels_last": "cl"}


def _num(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value * scale, spec)


def _cell(value: Optional[float], spec: str, check: Optional[Check], scale: float = 1.0) -> str:
    text = _num(value, spec, scale)
    return text + "!" if check is not None and check.passed is False else text


def _beyond(counts: Dict[str, int]) -> str:
    """How many of a target's misses no kernel could meet: `` (2 beyond the copy bandwidth, 3 beside an empty
    autograd step)``, or nothing."""
    parts = []
    if counts["beyond_copy"]:
        parts.append(f"{counts['beyond_copy']} beyond the copy bandwidth")
    if counts["beyond_copy_beside_empty"]:
        parts.append(f"{counts['beyond_copy_beside_empty']} beyond it beside an empty autograd step")
    return f" ({', '.join(parts)})" if parts else ""


def _row_cells(row: Row) -> List[str]:
    shape = "x".join(map(str, row.shape)) + ("~" if row.cache_resident else "")
    head = [row.layer, shape, _DT.get(row.dtype, row.dtype), _FMT[row.memory_format]]
    if row.error is not None:
        return head + ["-"] * 11 + ["error: " + row.error[:100]]
    by_key: Dict[str, Check] = {c.key: c for c in checks(row)}
    saved = row.saved_vs_input
    missed = [c.describe() for c in by_key.values() if c.passed is False]
    unmeasured = [c.key for c in by_key.values() if c.passed is None]
    verdict = "ok" if not missed else "miss: " + ", ".join(missed)
    if unmeasured:
        verdict += " (n/a: " + ", ".join(unmeasured) + ")"
    tol = _AGREE_TOL.get(row.dtype, 1e-3)
    if row.max_abs_diff is not None and not row.max_abs_diff <= tol:
        verdict += f" [outputs differ from baseline by {row.max_abs_diff:.2g}]"
    return head + [
        _num(row.normzoo.fwd_s, ".2f", 1e3),
        _num(row.normzoo.fb_s, ".2f", 1e3),
        _num(row.baseline.fb_s, ".2f", 1e3),
        _cell(row.ratio_fb, ".2f", by_key.get("speedup")) + f"/{by_key['speedup'].threshold:g}",
        _num(row.gbps_fb, ".1f"),
        _num(row.copy_gbps, ".1f"),
        _cell(row.copy_fraction_fb, ".0%", by_key.get("copy")),
        _cell(saved, ".3f", by_key.get("saved")),
        _cell(row.vs_bn, ".2f", by_key.get("vs_bn")),
        _cell(row.bf16_vs_fp32, ".2f", by_key.get("bf16")),
        _num(row.others_cores, ".1f"),
        verdict,
    ]


# Largest |normzoo - baseline| output difference (first call, same initial state) not flagged in the table.
_AGREE_TOL = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 0.1, "float16": 0.02}

_HEADER = ["layer", "shape", "dtype", "format", "fwd", "f+b", "base f+b", "speedup/need", "GB/s", "copy", "%copy",
           "saved", "vsBN", "bf16/32", "busy", "targets"]
_RIGHT = set(range(4, 15))


def _grid(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in _RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(result: "BenchResult") -> str:
    """The readable report: settings and load, one line per row, the baselines and a target summary."""
    meta = result.meta
    mach = meta.get("machine", {})
    lines = [
        f"normzoo bench  {meta.get('started', '')}  torch {mach.get('torch', '?')}  threads {meta.get('threads')}  "
        f"cpu {mach.get('cpu') or '?'} ({mach.get('logical_cpus', '?')} logical)",
        f"allocator: {meta.get('allocator', {}).get('detail', '?')}; OpenMP wait: "
        f"{meta.get('omp_wait', {}).get('detail', '?')}; normzoo's kernel threads: {meta.get('kernel_threads', '?')}; "
        f"autograd ops: {meta.get('autograd_ops', '?')}",
        f"load: loadavg {meta.get('loadavg_before')} -> {meta.get('loadavg_after')}; other processes used "
        f"{_num(meta.get('others_cores'), '.2f')} cores on average during the run; wall {meta.get('wall_s')} s",
        f"times: medians in ms of interleaved rounds, "
        f"{'eval' if meta.get('settings', {}).get('mode') == 'eval' else 'training'} mode; "
        "speedup = baseline / normzoo (f+b)",
        "",
    ]
    if result.rows:
        body = [_HEADER] + [_row_cells(r) for r in result.rows]
        lines += _grid(body)
    else:
        lines.append("(no rows measured)")
    baselines = {}
    for r in result.rows:
        baselines.setdefault(r.layer, r.baseline_label + (f" -- {r.note}" if r.note else ""))
    if baselines:
        lines += ["", "baselines:"] + [f"  {k:<10} {v}" for k, v in baselines.items()]
    lines += ["", "saved = activation bytes saved for backward / input bytes (each storage once, parameters "
                  "and buffers excluded); ~ = fits in cache"]
    summ = summary(result.rows)
    if summ:
        parts = [f"{k}: {v['passed']} ok, {v['missed']} missed" + _beyond(v)
                 + (f", {v['unmeasured']} n/a" if v["unmeasured"] else "")
                 for k, v in summ.items()]
        lines.append("targets: " + "; ".join(parts))
    for s in result.skipped:
        lines.append(f"skipped {s['layer']}: {s['reason']}")
    return "\n".join(lines)


def write_json(result: "BenchResult", path: str) -> str:
    with open(path, "w") as fh:
        json.dump(result.to_dict(), fh, indent=1, default=str)
        fh.write("\n")
    return path


def write_plot(result: "BenchResult", path: str) -> Optional[str]:
    """Two panels, one bar per measured row: speedup over the baseline on a log scale, bars growing from 1x
    (lines at the 1x and 2x targets), and
    the fraction of copy bandwidth reached (line at 50%). Returns ``None`` if there is nothing to plot."""
    rows = [r for r in result.rows if r.error is None and r.ratio_fb is not None]
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import FuncFormatter

    labels = [r.label for r in rows]
    height = max(3.0, 0.2 * len(rows) + 1.0)
    fig = Figure(figsize=(12, height))
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    y = list(range(len(rows)))

    def bars(ax, values: List[float], passed: Callable[[Row], Optional[bool]], origin: float = 0.0) -> None:
        colors = ["tab:green" if passed(r) else "tab:red" if passed(r) is False else "tab:gray" for r in rows]
        ax.barh(y, [v - origin for v in values], left=origin, color=colors)
        ax.grid(axis="x", alpha=0.3)

    def passed_of(key: str) -> Callable[[Row], Optional[bool]]:
        return lambda r: next((c.passed for c in checks(r) if c.key == key), None)

    ratios = [r.ratio_fb or 1.0 for r in rows]
    bars(ax1, ratios, passed_of("speedup"), origin=1.0)  # bars grow from 1x: right = faster than the baseline
    ax1.set_xscale("log", base=2)
    ax1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax1.set_xlim(min(0.5, min(ratios) / 1.2), max(4.0, max(ratios) * 1.2))
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.axvline(2.0, color="k", lw=0.8, ls="--")
    ax1.set_xlabel("speedup over baseline, forward+backward (x, log scale)")
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=7)
    ax1.invert_yaxis()
    bars(ax2, [100 * (r.copy_fraction_fb or 0.0) for r in rows], passed_of("copy"))
    ax2.axvline(50.0, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("% of copy bandwidth, forward+backward")
    meta = result.meta
    fig.suptitle(f"normzoo bench: {meta.get('threads')} threads, torch {meta.get('machine', {}).get('torch', '?')}"
                 f" (green: target met, red: missed)", fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.3 / height))  # room for the title
    fig.savefig(path, dpi=110)
    return path


def write_all(result: "BenchResult", out_dir: str, plot: bool = True) -> Dict[str, str]:
    """Write ``results.json``, ``results.txt`` and (with ``plot``) ``results.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": write_json(result, os.path.join(out_dir, "results.json"))}
    txt = os.path.join(out_dir, "results.txt")
    with open(txt, "w") as fh:
        fh.write(format_table(result) + "\n")
    paths["table"] = txt
    if plot:
        png = write_plot(result, os.path.join(out_dir, "results.png"))
        if png is not None:
            paths["plot"] = png
    return paths


__all__ = ["format_table", "write_json", "write_plot", "write_all"]
