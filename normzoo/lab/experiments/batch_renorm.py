"""Batch Renormalization (Ioffe 2017) at micro-batches of 4.

The conv net of the batch-size experiment on MNIST-1D (same protocol: equal steps, Adam, learning rate
scaled by ``sqrt(B / 32)``), trained with BN at batch 32 (the reference), with BN at batch 4, and with Batch
Renorm (``brn1d``) at batch 4. Batch Renorm follows the paper's recipe scaled to the run: plain BN for the
first 5% of the steps, then ``r_max`` rising to 3 and ``d_max`` to 5
(:class:`normzoo.nn.renorm.RenormSchedule` when available, else the layers' fixed limits).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, Tuple

from ..runner import Context, Experiment
from .batch_size import train_conv

MICRO = 4
RECOVER = 0.5   # BRN must recover at least this fraction of BN's small-batch loss
MIN_LOSS = 0.02  # ... which must itself be at least this large to judge


def train_one(norm: str, batch_size: int, seed: int, steps: int) -> Dict[str, Any]:
    r = train_conv(norm, batch_size, seed, steps, eval_every=max(1, steps // 25))
    return {"final": {"test_acc": r["test_acc"]}, "steps": r["curve"]["steps"], "test_acc": r["curve"]["test_acc"]}


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(400, 2000, minimum=10)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    configs = (("bn", 32), ("bn", MICRO), ("brn", MICRO))
    jobs = [dict(norm=k, batch_size=b, seed=s, steps=steps) for k, b in configs for s in seeds]
    rs = ctx.map(train_one, jobs)
    runs: Dict[str, Any] = {}
    for k, b in configs:
        label = f"{k}{b}"
        sub = [r for j, r in zip(jobs, rs) if (j["norm"], j["batch_size"]) == (k, b)]
        runs[label] = {"final_test_acc": [r["final"]["test_acc"] for r in sub],
                       "curves": [{"steps": r["steps"], "test_acc": r["test_acc"]} for r in sub]}
    acc = {k: statistics.fmean(v["final_test_acc"]) for k, v in runs.items()}
    summary = {"BN, batch 32: test acc": round(acc["bn32"], 4), f"BN, batch {MICRO}: test acc": round(acc[f"bn{MICRO}"], 4),
               f"Batch Renorm, batch {MICRO}: test acc": round(acc[f"brn{MICRO}"], 4)}
    return {"steps": steps, "seeds": seeds, "micro": MICRO, "runs": runs, "acc": acc, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    a = n["acc"]
    big, bn, brn = a["bn32"], a[f"bn{MICRO}"], a[f"brn{MICRO}"]
    lost = big - bn
    text = f"test accuracy BN@32 {big:.3f}, BN@{MICRO} {bn:.3f}, BRN@{MICRO} {brn:.3f}"
    if lost < MIN_LOSS:
        return "inconclusive", f"BN lost only {lost:.3f} at batch {MICRO}, nothing to recover: " + text
    recovered = (brn - bn) / lost
    text += f"; BRN recovered {recovered:.0%} of BN's small-batch loss"
    return ("reproduced" if recovered >= RECOVER else "not reproduced"), text


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    styles = {"bn32": ("tab:gray", "BN, batch 32"), f"bn{MICRO}": ("tab:blue", f"BN, batch {MICRO}"),
              f"brn{MICRO}": ("tab:red", f"Batch Renorm, batch {MICRO}")}
    for k, (colour, label) in styles.items():
        for i, c in enumerate(n["runs"][k]["curves"]):
            ax.plot(c["steps"], c["test_acc"], color=colour, alpha=1 if i == 0 else 0.35, label=label if i == 0 else None)
    ax.set(xlabel="training step", ylabel="test accuracy (eval mode)", title="MNIST-1D conv net")
    ax.legend()


EXPERIMENT = Experiment(
    name="batch_renorm",
    title="Batch Renormalization at micro-batches",
    finding="Batch Renorm recovers much of the accuracy BN loses when trained with micro-batches of 4.",
    criterion=f"BN loses >= {MIN_LOSS:.0%} test accuracy from batch 32 to batch {MICRO} (else inconclusive), and "
              f"BRN at batch {MICRO} recovers >= {RECOVER:.0%} of that loss.",
    source="Ioffe 2017, sec. 4.3 (micro-batches)",
    run=run, judge=judge, plot=plot, requires=("brn1d",), figsize=(9.0, 4.2),
)
