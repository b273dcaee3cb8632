"""Does BN's batch noise regularize? Train/test gaps on a small training set.

The BN paper suggests that because each example is normalized with the statistics of a random mini-batch
("stochastic jittering"), BN acts as a regularizer; later work disputes how much. Here a 3x100 ReLU MLP is
trained on 200 digits (SGD, momentum 0.9, batch 16) until it fits them, in three versions:

- ``plain`` -- no normalization;
- ``bn`` -- BatchNorm with mini-batch statistics (the jitter);
- ``bn_full`` -- the same BN layers, but at every step the statistics are those of the *whole* training set
  (the mini-batch is forwarded together with all 200 training samples and only its own outputs enter the
  loss), so each example's normalization no longer depends on which others share its batch: the batch
  statistics are frozen to the population ones and the jitter is gone.

The jitter effect is ``test_acc(bn) - test_acc(bn_full)``, averaged over seeds, compared with twice its
standard error.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import data as lab_data
from ..models import MLP
from ..runner import Context, Experiment
from ..train import fit, seeded

N_TRAIN = 200
VARIANTS = ("plain", "bn", "bn_full")


def train_one(variant: str, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.digits().subset(N_TRAIN)
    seeded(seed)
    net = MLP(d.num_features, [100] * 3, d.num_classes, activation="relu", norm="none" if variant == "plain" else "bn")
    everything = d.x_train

    def whole_set_stats(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(torch.cat([xb, everything]))[: len(yb)], yb)

    h = fit(net, d, steps=steps, batch_size=16, lr=0.05, momentum=0.9, seed=seed,
            loss_fn=whole_set_stats if variant == "bn_full" else None)
    return h.final


def _mean_se(xs: List[float]) -> Tuple[float, float]:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(400, 1500)
    seeds = ctx.thin([ctx.seed + i for i in range(ctx.pick(3, 10))], minimum=2)
    jobs = [dict(variant=v, seed=s, steps=steps) for v in VARIANTS for s in seeds]
    finals = ctx.map(train_one, jobs)
    per: Dict[str, Dict[str, List[float]]] = {}
    for v in VARIANTS:
        fs = [f for j, f in zip(jobs, finals) if j["variant"] == v]
        per[v] = {"train_acc": [f["train_acc"] for f in fs], "test_acc": [f["test_acc"] for f in fs],
                  "gap": [f["train_acc"] - f["test_acc"] for f in fs]}
    diffs = [a - b for a, b in zip(per["bn"]["test_acc"], per["bn_full"]["test_acc"])]  # paired by seed
    effect, se = _mean_se(diffs)
    summary: Dict[str, Any] = {}
    for v in VARIANTS:
        for k in ("train_acc", "test_acc", "gap"):
            m, s = _mean_se(per[v][k])
            summary[f"{v}: {k.replace('_', ' ')} (mean +- s.e.)"] = f"{m:.4f} +- {s:.4f}"
    summary["jitter effect on test acc, bn - bn_full (paired)"] = f"{effect:+.4f} +- {se:.4f}"
    return {"n_train": N_TRAIN, "steps": steps, "seeds": seeds, "runs": per, "jitter_effect": effect,
            "jitter_effect_se": se, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    effect, se = n["jitter_effect"], n["jitter_effect_se"]
    if se is None or len(n["seeds"]) < 2:
        return "inconclusive", "too few seeds to measure the noise"
    gap = {v: statistics.fmean(n["runs"][v]["gap"]) for v in VARIANTS}
    fit_all = min(statistics.fmean(n["runs"][v]["train_acc"]) for v in VARIANTS)
    text = (f"test accuracy with mini-batch statistics minus with whole-set statistics: {effect:+.4f} "
            f"(s.e. {se:.4f}, {len(n['seeds'])} seeds); train-test gaps: plain {gap['plain']:.3f}, "
            f"BN {gap['bn']:.3f}, BN without jitter {gap['bn_full']:.3f}")
    if fit_all < 0.95:
        return "inconclusive", f"not every variant fitted its {n['n_train']} training samples: {text}"
    if effect > 2 * se:
        return "reproduced", "the batch jitter helps generalization: " + text
    if effect < -2 * se:
        return "not reproduced", "the batch jitter hurts generalization here: " + text
    return "not reproduced", "no measurable regularization from the batch jitter: " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    labels = {"plain": "without BN", "bn": "BN\n(batch stats)", "bn_full": "BN, whole-set\nstats (no jitter)"}
    colours = {"plain": "tab:blue", "bn": "tab:red", "bn_full": "tab:purple"}
    for i, (key, title) in enumerate((("test_acc", "test accuracy"), ("gap", "train - test accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for x, v in enumerate(VARIANTS):
            ys = n["runs"][v][key]
            ax.scatter([x] * len(ys), ys, color=colours[v], alpha=0.6)
            ax.errorbar([x + 0.15], [statistics.fmean(ys)], yerr=[2 * (statistics.stdev(ys) / math.sqrt(len(ys)))
                        if len(ys) > 1 else 0], fmt="D", color="black", capsize=4)
        ax.set_xticks(range(len(VARIANTS)), [labels[v] for v in VARIANTS])
        ax.set(title=f"{title} ({n['n_train']} training digits; mean +- 2 s.e.)")


EXPERIMENT = Experiment(
    name="regularization",
    title="Is BN's mini-batch noise a regularizer? (disputed)",
    finding="BN regularizes through 'stochastic jittering': normalizing each example with the statistics of a "
            "random mini-batch improves generalization beyond what the normalization itself does.",
    criterion="On 200 training digits, test accuracy with mini-batch statistics exceeds that with whole-"
              "training-set statistics (same layers, no jitter) by more than 2 standard errors (paired over seeds).",
    source="Ioffe & Szegedy 2015, sec. 3.4; disputed e.g. by Luo et al. 2019 and Summers & Dinneen 2020",
    run=run, judge=judge, plot=plot, figsize=(12.0, 4.2),
)
