"""The lab report: one PNG per experiment and one self-contained HTML page (``index.html``).

Figures are drawn from the numbers stored in ``results.json`` (never from live objects), so
:func:`rebuild` recreates the page and every figure from a results folder alone. The page references the
PNGs by relative path (``figures/NAME.png``) and needs no server: open it straight from disk.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from .runner import Experiment, Result, load_results

__all__ = ["draw_figure", "write_html", "rebuild", "FIGURE_DIR", "HTML_FILE"]

FIGURE_DIR = "figures"
HTML_FILE = "index.html"

_COLOURS = {"reproduced": "#1b7f3b", "not reproduced": "#b3261e", "inconclusive": "#a15c00", "pending": "#5f6368",
            "error": "#7a0019"}


def draw_figure(exp: Experiment, result: Result, out: os.PathLike) -> Optional[str]:
    """Draw ``exp``'s figure from ``result.numbers`` into ``out/figures/NAME.png``; its relative path.

    None (and no file) when the result has no numbers (pending, error).
    """
    if not result.numbers or result.verdict in ("pending", "error"):
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rel = f"{FIGURE_DIR}/{exp.name}.png"
    path = Path(out) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=exp.figsize, dpi=100)
    try:
        exp.plot(result.numbers, fig)
        fig.suptitle(f"{exp.title}  [{result.verdict}]", fontsize=11, y=0.995)
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return rel


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) <= 12:
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if v is None:
        return "n/a"
    return str(v)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#202124;line-height:1.45}
h1{margin-bottom:.2em} .meta{color:#5f6368;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #dadce0;padding:.25em .6em;text-align:left;
vertical-align:top;font-size:.92em} th{background:#f1f3f4}
.badge{display:inline-block;color:#fff;border-radius:1em;padding:.05em .7em;font-size:.85em;font-weight:600;
white-space:nowrap}
section{border-top:2px solid #e8eaed;margin-top:2em;padding-top:.6em}
.finding{background:#f8f9fa;border-left:4px solid #5f6368;padding:.4em .8em}
.warn{background:#fce8e6;border-left:4px solid #b3261e;padding:.4em .8em}
img{max-width:100%;border:1px solid #e8eaed} pre{background:#f8f9fa;padding:.6em;overflow:auto;font-size:.8em;
max-height:28em} a{color:#1a73e8}
"""


def _badge(verdict: str) -> str:
    return (f'<span class="badge" style="background:{_COLOURS.get(verdict, "#5f6368")}">'
            f"{html.escape(verdict)}</span>")


def _section(r: Result) -> str:
    e = html.escape
    parts = [f'<section id="{e(r.name)}"><h2>{e(r.title)} {_badge(r.verdict)}</h2>',
             f'<p class="meta"><code>{e(r.name)}</code> &middot; {e(r.source)} &middot; '
             f'{"quick" if r.config.get("quick", True) else "full"}, seed {r.config.get("seed", "?")}'
             f'{", scale " + str(r.config.get("scale")) if r.config.get("scale", 1) != 1 else ""}'
             f' &middot; {r.elapsed_s:.1f} s</p>',
             f'<p class="finding"><b>Finding tested:</b> {e(r.finding)}<br><b>Criterion:</b> {e(r.criterion)}</p>']
    if r.verdict == "not reproduced":
        parts.append(f'<p class="warn"><b>The claim did not reproduce here.</b> {e(r.reason)}</p>')
    elif r.verdict == "pending":
        parts.append(f'<p class="warn" style="background:#f1f3f4;border-color:#5f6368"><b>Pending:</b> {e(r.reason)}'
                     "</p>")
    elif r.verdict == "error":
        parts.append(f'<p class="warn"><b>The experiment failed:</b> {e(r.reason)}</p>'
                     f"<details><summary>traceback</summary><pre>{e(r.error or '')}</pre></details>")
    else:
        parts.append(f"<p><b>Verdict:</b> {e(r.verdict)} &mdash; {e(r.reason)}</p>")
    if r.figure:
        parts.append(f'<p><a href="{e(r.figure)}"><img src="{e(r.figure)}" alt="figure for {e(r.name)}"></a></p>')
    summary = r.numbers.get("summary") if isinstance(r.numbers, dict) else None
    if summary:
        rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_fmt(v))}</td></tr>" for k, v in summary.items())
        parts.append(f"<table>{rows}</table>")
    if r.numbers:
        parts.append(f"<details><summary>all numbers (also in results.json)</summary><pre>"
                     f"{e(json.dumps(r.numbers, indent=1))}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)


def write_html(out: os.PathLike, results: Dict[str, Result]) -> Path:
    """Write ``out/index.html`` for ``results`` (in the lab's experiment order); its path."""
    from .experiments import ORDER

    names = [n for n in ORDER if n in results] + sorted(n for n in results if n not in ORDER)
    e = html.escape
    counts: Dict[str, int] = {}
    for n in names:
        counts[results[n].verdict] = counts.get(results[n].verdict, 0) + 1
    rows = "".join(
        f'<tr><td><a href="#{e(n)}">{e(results[n].title)}</a></td><td>{_badge(results[n].verdict)}</td>'
        f"<td>{e(results[n].reason)}</td></tr>" for n in names)
    not_run = [n for n in ORDER if n not in results]
    versions = next((results[n].versions for n in names if results[n].versions), {})
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>normzoo lab report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><h1>normzoo lab</h1>
<p class="meta">Experiments that test what the Batch Normalization literature claims. Each states its finding,
the criterion it is judged by, and the verdict computed from its own numbers (all in
<a href="results.json">results.json</a>). {e(', '.join(f'{k} {v}' for k, v in versions.items()))}</p>
<p>{e(', '.join(f'{v} {k}' for k, v in sorted(counts.items())))}</p>
<table><tr><th>experiment</th><th>verdict</th><th>why</th></tr>{rows}</table>
{'<p class="meta">Not run in this folder: ' + e(', '.join(not_run)) + '.</p>' if not_run else ''}
{''.join(_section(results[n]) for n in names)}
</body></html>
"""
    path = Path(out) / HTML_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def rebuild(out: os.PathLike) -> Path:
    """Redraw every figure and the page from ``out/results.json`` (raises CorruptResults if unreadable)."""
    from .experiments import ORDER, get

    out = Path(out)
    results = load_results(out, on_corrupt="raise")
    if not results:
        raise FileNotFoundError(f"normzoo lab report: no results in {out} (expected {out / 'results.json'})")
    for name, r in results.items():
        if name in ORDER:
            r.figure = draw_figure(get(name), r, out)
    return write_html(out, results)
