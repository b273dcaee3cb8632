"""CS231n's batch-norm assignment: sensitivity to the weight-initialization scale.

An 8-layer ReLU MLP (7 hidden layers of 50) on the digits, every weight drawn from ``N(0, s^2)`` for 20
scales ``s = logspace(-4, 0, 20)``, trained with Adam (lr 1e-3, batch 50) with and without BN. A net
"trains" at a scale when its final test accuracy reaches :data:`TRAINS` (chance is 10%).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from .. import data as lab_data
from ..models import MLP, log_range
from ..runner import Context, Experiment
from ..train import fit, seeded

TRAINS = 0.5
BN_MIN_FRACTION = 0.75
PLAIN_MAX_FRACTION = 0.5


def train_one(norm: str, scale: float, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.digits()
    seeded(seed)
    net = MLP(d.num_features, [50] * 7, d.num_classes, activation="relu", norm=norm, weight_scale=scale)
    h = fit(net, d, steps=steps, batch_size=50, lr=1e-3, seed=seed, optimizer="adam")
    return h.final


def run(ctx: Context) -> Dict[str, Any]:
    scales = ctx.thin(log_range(-4, 0, 20))
    steps = ctx.steps(150, 800)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    jobs = [dict(norm=n, scale=s, seed=sd, steps=steps) for n in ("none", "bn") for s in scales for sd in seeds]
    finals = ctx.map(train_one, jobs)
    curves: Dict[str, Dict[str, list]] = {}
    for label, norm in (("plain", "none"), ("bn", "bn")):
        per = {k: [] for k in ("test_acc", "train_acc", "train_loss")}
        for s in scales:
            fs = [f for j, f in zip(jobs, finals) if j["norm"] == norm and j["scale"] == s]
            for k in per:
                per[k].append(sum(f[k] for f in fs) / len(fs))
        curves[label] = per
    trains = {k: [a >= TRAINS for a in curves[k]["test_acc"]] for k in curves}
    frac = {k: sum(v) / len(v) for k, v in trains.items()}
    band = {k: [s for s, ok in zip(scales, trains[k]) if ok] for k in trains}
    summary = {f"{k}: scales where it trains (test acc >= {TRAINS:.0%})": f"{sum(trains[k])} of {len(scales)}"
               + (f", {min(band[k]):.2g} to {max(band[k]):.2g}" if band[k] else "") for k in ("plain", "bn")}
    summary.update({f"{k}: best test acc": max(curves[k]["test_acc"]) for k in ("plain", "bn")})
    return {"scales": scales, "steps": steps, "seeds": seeds, "curves": curves, "fraction_trained": frac,
            "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    f_bn, f_plain = n["fraction_trained"]["bn"], n["fraction_trained"]["plain"]
    total = len(n["scales"])
    text = (f"BN trains at {round(f_bn * total)} of {total} scales, the plain net at {round(f_plain * total)} "
            f"(test accuracy >= {TRAINS:.0%} after {n['steps']} steps)")
    if f_bn == 0:
        return "inconclusive", "the BN net trained at no scale: " + text
    if f_bn >= BN_MIN_FRACTION and f_plain <= PLAIN_MAX_FRACTION:
        return "reproduced", text
    return "not reproduced", text


def plot(n: Dict[str, Any], fig: Any) -> None:
    panels = (("test_acc", "final test accuracy"), ("train_acc", "final training accuracy"),
              ("train_loss", "final training loss"))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for label, name, colour in (("plain", "without BN", "tab:blue"), ("bn", "with BN", "tab:red")):
            ax.semilogx(n["scales"], n["curves"][label][key], "o-", color=colour, label=name, ms=4)
        if key == "test_acc":
            ax.axhline(TRAINS, color="grey", ls=":", lw=1)
        ax.set(xlabel="weight initialization scale", title=title)
        if key == "train_loss":
            ax.set_yscale("log")
        ax.legend()


EXPERIMENT = Experiment(
    name="init_scale",
    title="BN makes training insensitive to the weight-initialization scale (CS231n)",
    finding="An 8-layer MLP with BN trains across most weight-initialization scales from 1e-4 to 1; without BN "
            "it trains only in a narrow band of scales.",
    criterion=f"Counting a scale as trained when test accuracy >= {TRAINS:.0%}: BN trains at >= "
              f"{BN_MIN_FRACTION:.0%} of the 20 scales and the plain net at <= {PLAIN_MAX_FRACTION:.0%}.",
    source="CS231n assignment 2, BatchNormalization.ipynb (weight_scales = logspace(-4, 0, 20)); "
           "here digits, 7 hidden layers of 50, Adam lr 1e-3, batch 50",
    run=run, judge=judge, plot=plot, figsize=(13.0, 4.0),
)
