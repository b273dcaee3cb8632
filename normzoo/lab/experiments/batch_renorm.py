"""Batch Renormalization (Ioffe 2017) at micro-batches of 4.

As in the paper's micro-batch experiment, every step sees a batch of 32 examples, but the normalization
statistics are computed over micro-batches of 4 inside it (each micro-batch normalized on its own, as on
separate workers; :class:`normzoo.lab.models.GhostNorm`), so the only difference from the reference is
the size of the statistics group. The conv net of the batch-size experiment on MNIST-1D (Adam, lr 3e-3)
is trained with BN over the whole batch of 32 (the reference), BN over micro-batches of 4, and Batch
Renorm (``brn1d``) over micro-batches of 4. Each micro-batch updates the moving averages (which Batch
Renorm's ``r`` and ``d`` are computed against), so their momentum per update is ``1 - 0.9^(4/32)`` = 0.013
(near the paper's 0.01): the averages then forget at the same rate per training step (momentum 0.1) as
the reference's. Batch Renorm follows the paper's recipe scaled to the run: plain BN for the
first 5% of the steps, then ``r_max`` rising to 3 and ``d_max`` to 5
(:class:`normzoo.nn.renorm.RenormSchedule` when available, else the layers' fixed limits).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, Tuple

from ..runner import Context, Experiment
from .batch_size import train_conv

BATCH = 32
MICRO = 4
MOMENTUM_PER_STEP = 0.1  # moving averages forget at the same rate per training step in every variant
RECOVER = 0.5   # BRN must recover at least this fraction of BN's small-batch loss
MIN_LOSS = 0.02  # ... which must itself be at least this large to judge


def train_one(norm: str, micro: int, seed: int, steps: int) -> Dict[str, Any]:
    updates = BATCH // micro if micro else 1  # each micro-batch updates the moving averages once
    momentum = 1 - (1 - MOMENTUM_PER_STEP) ** (1 / updates)
    r = train_conv(norm, BATCH, seed, steps, ghost=micro, eval_every=max(1, steps // 25),
                   norm_kwargs={"momentum": momentum})
    return {"final": {"test_acc": r["test_acc"]}, "steps": r["curve"]["steps"], "test_acc": r["curve"]["test_acc"]}


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(400, 2000, minimum=10)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    configs = (("bn", BATCH), ("bn", MICRO), ("brn", MICRO))
    jobs = [dict(norm=k, micro=0 if b == BATCH else b, seed=s, steps=steps) for k, b in configs for s in seeds]
    rs = ctx.map(train_one, jobs)
    runs: Dict[str, Any] = {}
    for k, b in configs:
        label = f"{k}{b}"
        sub = [r for j, r in zip(jobs, rs) if (j["norm"], j["micro"] or BATCH) == (k, b)]
        runs[label] = {"final_test_acc": [r["final"]["test_acc"] for r in sub],
                       "curves": [{"steps": r["steps"], "test_acc": r["test_acc"]} for r in sub]}
    acc = {k: statistics.fmean(v["final_test_acc"]) for k, v in runs.items()}
    summary = {f"BN, statistics over the batch of {BATCH}: test acc": round(acc[f"bn{BATCH}"], 4),
               f"BN, micro-batches of {MICRO}: test acc": round(acc[f"bn{MICRO}"], 4),
               f"Batch Renorm, micro-batches of {MICRO}: test acc": round(acc[f"brn{MICRO}"], 4)}
    return {"steps": steps, "seeds": seeds, "micro": MICRO, "runs": runs, "acc": acc, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    a = n["acc"]
    big, bn, brn = a[f"bn{BATCH}"], a[f"bn{MICRO}"], a[f"brn{MICRO}"]
    lost = big - bn
    text = (f"test accuracy with statistics over {BATCH}: BN {big:.3f}; over micro-batches of {MICRO}: BN {bn:.3f}, "
            f"BRN {brn:.3f}")
    if lost < MIN_LOSS:
        return "inconclusive", f"BN lost only {lost:.3f} with micro-batches of {MICRO}, nothing to recover: " + text
    recovered = (brn - bn) / lost
    text += f"; BRN recovered {recovered:.0%} of BN's small-batch loss"
    return ("reproduced" if recovered >= RECOVER else "not reproduced"), text


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    styles = {f"bn{BATCH}": ("tab:gray", f"BN, statistics over the batch of {BATCH}"),
              f"bn{MICRO}": ("tab:blue", f"BN, micro-batches of {MICRO}"),
              f"brn{MICRO}": ("tab:red", f"Batch Renorm, micro-batches of {MICRO}")}
    for k, (colour, label) in styles.items():
        for i, c in enumerate(n["runs"][k]["curves"]):
            ax.plot(c["steps"], c["test_acc"], color=colour, alpha=1 if i == 0 else 0.35, label=label if i == 0 else None)
    ax.set(xlabel="training step", ylabel="test accuracy (eval mode)",
           title=f"MNIST-1D conv net, batches of {BATCH}")
    ax.legend()


EXPERIMENT = Experiment(
    name="batch_renorm",
    title="Batch Renormalization at micro-batches",
    finding="Batch Renorm recovers much of the accuracy BN loses when its statistics come from micro-batches of 4.",
    criterion=f"BN over micro-batches of {MICRO} loses >= {MIN_LOSS:.0%} test accuracy against BN over the whole "
              f"batch of {BATCH} (else inconclusive), and BRN over micro-batches of {MICRO} recovers >= "
              f"{RECOVER:.0%} of that loss.",
    source="Ioffe 2017, sec. 4.3 (micro-batches of 4 inside batches of 32)",
    run=run, judge=judge, plot=plot, requires=("brn1d",), figsize=(9.0, 4.2),
)
