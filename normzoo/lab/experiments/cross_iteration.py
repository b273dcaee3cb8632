"""Cross-Iteration BatchNorm (Yao et al. 2021) at batches of 2 and 4.

The conv net of the batch-size experiment on MNIST-1D (same protocol: equal steps, Adam, learning rate
scaled by ``sqrt(B / 32)``) with BN, with naive windowed statistics (``cbn1d``, ``compensate=False``) and with
compensated Cross-Iteration BN (``cbn1d`` attached to its preceding convolution), window 4, a short burn-in.

Compensation error: in the compensated run, every few steps, the statistics the first CBN layer used for
the previous iterations -- compensated to the current weights, and as recorded -- are compared with the
exact statistics of those same past mini-batches recomputed with the current weights (the first layer's
input is the data, so the recomputation is exact). Errors are relative: ``|mean_est - mean| / std`` and
``|var_est - var| / var``, averaged over channels and past iterations.
"""
from __future__ import annotations

import collections
import statistics
from typing import Any, Deque, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import data as lab_data
from ..models import ConvNet1d
from ..runner import Context, Experiment
from ..train import fit, seeded
from .batch_size import lr_for

WINDOW = 4
VARIANTS = ("bn", "cbn_naive", "cbn")
LABELS = {"bn": "BN", "cbn_naive": "CBN, naive window", "cbn": "CBN, compensated"}


def _errors(lw: Any, past: List[torch.Tensor], conv: torch.nn.Conv1d) -> Dict[str, float]:
    errs: Dict[str, List[float]] = {"mean": [], "var": [], "raw_mean": [], "raw_var": []}
    with torch.no_grad():
        for slot, xp in enumerate(past, start=1):
            if slot >= len(lw.count) or float(lw.count[slot]) == 0:
                continue
            y = F.conv1d(xp, conv.weight, conv.bias, conv.stride, conv.padding)
            mean, var = y.mean((0, 2)), y.var((0, 2), unbiased=False)
            std = (var + 1e-5).sqrt()
            errs["mean"].append(float(((lw.mean[slot] - mean).abs() / std).mean()))
            errs["raw_mean"].append(float(((lw.raw_mean[slot] - mean).abs() / std).mean()))
            errs["var"].append(float(((lw.var[slot] - var).abs() / (var + 1e-5)).mean()))
            errs["raw_var"].append(float(((lw.raw_var[slot] - var).abs() / (var + 1e-5)).mean()))
    return {k: statistics.fmean(v) for k, v in errs.items() if v}


def train_one(variant: str, batch_size: int, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.mnist1d()
    seeded(seed)
    if variant == "bn":
        net = ConvNet1d("bn")
    else:
        kw = dict(window=WINDOW, burn_in=max(WINDOW, steps // 20), compensate=variant == "cbn")
        net = ConvNet1d("cbn", norm_kwargs=kw)  # the compensated layers are attached to their convolutions
    errors: List[Dict[str, float]] = []
    past: Deque[torch.Tensor] = collections.deque(maxlen=WINDOW - 1)
    every = max(1, steps // 60)
    count = [0]

    def loss_fn(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = model(xb)
        count[0] += 1
        lw = getattr(net.norms[0], "last_window", None)
        if variant == "cbn" and lw is not None and count[0] % every == 0:
            e = _errors(lw, list(past), net.convs[0])
            if e:
                errors.append(dict(e, step=count[0]))
        past.appendleft(xb)
        return F.cross_entropy(out, yb)

    h = fit(net, d, steps=steps, batch_size=batch_size, lr=lr_for(batch_size), optimizer="adam", seed=seed,
            loss_fn=loss_fn)
    return {"test_acc": h.final["test_acc"], "diverged": h.diverged, "errors": errors}


def run(ctx: Context) -> Dict[str, Any]:
    sizes = [2, 4]
    steps = ctx.steps(400, 2000, minimum=12)
    jobs = [dict(variant=v, batch_size=b, seed=ctx.seed, steps=steps) for v in VARIANTS for b in sizes]
    rs = ctx.map(train_one, jobs)
    acc = {v: [r["test_acc"] for j, r in zip(jobs, rs) if j["variant"] == v] for v in VARIANTS}
    errs = {str(j["batch_size"]): r["errors"] for j, r in zip(jobs, rs) if j["variant"] == "cbn"}
    med = {b: {k: statistics.median(e[k] for e in es) for k in ("mean", "raw_mean", "var", "raw_var")}
           for b, es in errs.items() if es}
    summary: Dict[str, Any] = {f"{LABELS[v]}: test acc at batch {sizes}": [round(a, 4) for a in acc[v]]
                               for v in VARIANTS}
    for b, m in med.items():
        summary[f"batch {b}: median error of past means, compensated / as recorded"] = [round(m["mean"], 4),
                                                                                         round(m["raw_mean"], 4)]
        summary[f"batch {b}: median error of past variances, compensated / as recorded"] = [round(m["var"], 4),
                                                                                             round(m["raw_var"], 4)]
    return {"batch_sizes": sizes, "steps": steps, "window": WINDOW, "acc": acc,
            "errors": errs, "median_errors": med, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    acc, med = n["acc"], n["median_errors"]
    if not med:
        return "inconclusive", "no compensation error could be measured (run too short for the window)"
    text = (f"at batch 2: BN {acc['bn'][0]:.3f}, naive window {acc['cbn_naive'][0]:.3f}, compensated "
            f"{acc['cbn'][0]:.3f}; " + "; ".join(
                f"batch {b}: error of past means {m['mean']:.3g} compensated vs {m['raw_mean']:.3g} as recorded, "
                f"of variances {m['var']:.3g} vs {m['raw_var']:.3g}" for b, m in med.items()))
    trains = acc["cbn"][0] > acc["bn"][0]
    smaller = all(m["mean"] + m["var"] < m["raw_mean"] + m["raw_var"] for m in med.values())
    if trains and smaller:
        return "reproduced", text
    failed = [w for w, ok in (("compensated CBN did not beat BN at batch 2", trains),
                              ("compensation did not reduce the statistics' error", smaller)) if not ok]
    return "not reproduced", "; ".join(failed) + ": " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 2, 1)
    width = 0.25
    for i, v in enumerate(VARIANTS):
        xs = [k + (i - 1) * width for k in range(len(n["batch_sizes"]))]
        bars = ax.bar(xs, n["acc"][v], width=width, label=LABELS[v])
        for rect, a in zip(bars, n["acc"][v]):
            ax.annotate(f"{a:.3f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(n["batch_sizes"])), [f"batch {b}" for b in n["batch_sizes"]])
    ax.set(ylabel="test accuracy", title=f"window {n['window']}, {n['steps']} steps")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for b, es in n["errors"].items():
        if not es:
            continue
        steps = [e["step"] for e in es]
        line, = ax.semilogy(steps, [e["var"] for e in es], label=f"batch {b}: variance, compensated")
        ax.semilogy(steps, [e["raw_var"] for e in es], color=line.get_color(), ls="--",
                    label=f"batch {b}: variance, as recorded")
        line, = ax.semilogy(steps, [e["mean"] for e in es], label=f"batch {b}: mean, compensated")
        ax.semilogy(steps, [e["raw_mean"] for e in es], color=line.get_color(), ls="--",
                    label=f"batch {b}: mean, as recorded")
    ax.set(xlabel="training step", ylabel="relative error vs exact recomputation",
           title="first layer: statistics of past iterations")
    ax.legend(fontsize=7)


EXPERIMENT = Experiment(
    name="cross_iteration",
    title="Cross-Iteration BN: windowed statistics at tiny batches, and what compensation buys",
    finding="Pooling the statistics of recent iterations lets training work at batch sizes where BN collapses, "
            "and the Taylor compensation makes the past statistics closer to what the current weights give.",
    criterion="At batch 2 compensated CBN's test accuracy is above BN's, and at both batch sizes the compensated "
              "past statistics are closer to the exact recomputation than the recorded ones (mean + variance error).",
    source="Yao, Cao, Zheng, Huang & Lin 2021, sec. 3-4",
    run=run, judge=judge, plot=plot, requires=("cbn1d",), figsize=(12.0, 4.2),
)
