"""Batch Renormalization (Ioffe 2017) at micro-batches of 4.

The conv net of the batch-size experiment on MNIST-1D (same epochs, Adam, learning rate scaled by
``sqrt(B / 32)``), trained with BN at batch 32 (the reference), with BN at batch 4, and with Batch Renorm
(``brn1d``) at batch 4. Batch Renorm follows the paper's recipe scaled to the run: plain BN for the first
5% of the steps, then ``r_max`` rising to 3 and ``d_max`` to 5 (:class:`normzoo.nn.renorm.RenormSchedule`
when available, else the layers' fixed limits).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, Tuple

from .. import data as lab_data
from ..models import ConvNet1d
from ..runner import Context, Experiment
from ..train import fit, seeded
from .batch_size import BASE_LR

MICRO = 4
RECOVER = 0.5   # BRN must recover at least this fraction of BN's small-batch loss
MIN_LOSS = 0.02  # ... which must itself be at least this large to judge


def train_one(norm: str, batch_size: int, seed: int, n_train: int, epochs: int) -> Dict[str, Any]:
    d = lab_data.mnist1d().subset(n_train)
    seeded(seed)
    net = ConvNet1d(norm)
    steps = epochs * n_train // batch_size
    on_step = None
    if norm == "brn":
        try:
            from normzoo.nn.renorm import RenormSchedule
        except ImportError:  # the layers keep their constructor limits
            RenormSchedule = None
        if RenormSchedule is not None:
            start = steps // 20
            sched = RenormSchedule(net, r_steps=(start, max(start, steps // 2)), d_steps=(start, max(start, steps // 3)))
            on_step = lambda step, model, loss: sched.step()  # noqa: E731
    h = fit(net, d, steps=steps, batch_size=batch_size, lr=BASE_LR * (batch_size / 32) ** 0.5, optimizer="adam",
            seed=seed, on_step=on_step, eval_every=max(1, steps // 25))
    return {"steps": h.steps, "test_acc": h.test_acc, "final": h.final}


def run(ctx: Context) -> Dict[str, Any]:
    n_train = max(200, int(ctx.pick(1000, 2000) * min(1.0, ctx.scale * 4)))
    epochs = max(1, int(round(ctx.pick(3, 6) * ctx.scale)))
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    configs = (("bn", 32), ("bn", MICRO), ("brn", MICRO))
    jobs = [dict(norm=k, batch_size=b, seed=s, n_train=n_train, epochs=epochs) for k, b in configs for s in seeds]
    rs = ctx.map(train_one, jobs)
    runs: Dict[str, Any] = {}
    for k, b in configs:
        label = f"{k}{b}"
        sub = [r for j, r in zip(jobs, rs) if (j["norm"], j["batch_size"]) == (k, b)]
        runs[label] = {"final_test_acc": [r["final"]["test_acc"] for r in sub],
                       "curves": [{"epoch": [s * b / n_train for s in r["steps"]], "test_acc": r["test_acc"]}
                                  for r in sub]}
    acc = {k: statistics.fmean(v["final_test_acc"]) for k, v in runs.items()}
    summary = {"BN, batch 32: test acc": round(acc["bn32"], 4), f"BN, batch {MICRO}: test acc": round(acc[f"bn{MICRO}"], 4),
               f"Batch Renorm, batch {MICRO}: test acc": round(acc[f"brn{MICRO}"], 4)}
    return {"n_train": n_train, "epochs": epochs, "seeds": seeds, "micro": MICRO, "runs": runs, "acc": acc,
            "summary": summary}


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
            ax.plot(c["epoch"], c["test_acc"], color=colour, alpha=1 if i == 0 else 0.35, label=label if i == 0 else None)
    ax.set(xlabel="epoch", ylabel="test accuracy (eval mode)", title=f"MNIST-1D conv net, {n['n_train']} training samples")
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
