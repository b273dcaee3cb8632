"""Weight Normalization (Salimans & Kingma 2016): faster early training, and WN + mean-only BN.

A ReLU MLP (3 hidden layers of 128) on MNIST-1D (flattened), Adam (lr 2e-3, batch 32), four versions:
``plain`` (torch's default init), ``bn`` (BatchNorm after every hidden linear layer), ``wn`` (every linear
layer weight-normalized with :func:`normzoo.nn.weight_norm`, ``v ~ N(0, 0.05)`` and the data-dependent
initialization :func:`normzoo.nn.data_dependent_init` on 256 training samples) and ``wn_mbn`` (WN plus
mean-only BatchNorm after every hidden linear layer, initialized the same way).

Early training = the mean training loss over the first :data:`EARLY` of the steps.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Tuple

import torch

from .. import data as lab_data
from ..models import MLP, nn_function
from ..runner import Context, Experiment
from ..train import fit, seeded

VARIANTS = ("plain", "bn", "wn", "wn_mbn")
LABELS = {"plain": "plain", "bn": "BatchNorm", "wn": "WeightNorm (data-dependent init)",
          "wn_mbn": "WeightNorm + mean-only BN"}
EARLY = 0.1


def train_one(variant: str, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.mnist1d().flat()
    seeded(seed)
    norm = {"plain": "none", "bn": "bn", "wn": "none", "wn_mbn": "mbn"}[variant]
    net = MLP(d.num_features, [128] * 3, d.num_classes, activation="relu", norm=norm)
    if variant.startswith("wn"):
        weight_norm, ddi = nn_function("weight_norm"), nn_function("data_dependent_init")
        for lin in net.linears():
            weight_norm(lin)
            with torch.no_grad():
                lin.parametrizations.weight.original1.normal_(0.0, 0.05)  # v (original0 is g)
        init = torch.Generator().manual_seed(seed + 10_000)
        ddi(net, d.x_train[torch.randperm(len(d.y_train), generator=init)[:256]])
    losses: List[float] = []
    h = fit(net, d, steps=steps, batch_size=32, lr=2e-3, optimizer="adam", seed=seed,
            eval_every=max(1, steps // 40), on_step=lambda s, m, loss: losses.append(loss))
    k = max(1, int(len(losses) * EARLY))
    return {"steps": h.steps, "test_acc": h.test_acc, "early_loss": statistics.fmean(losses[:k]) if losses else None,
            "loss_curve": [statistics.fmean(losses[i:i + k]) for i in range(0, len(losses), k)],
            "final": h.final, "diverged": h.diverged}


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(500, 4000)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    jobs = [dict(variant=v, seed=s, steps=steps) for v in VARIANTS for s in seeds]
    rs = ctx.map(train_one, jobs)
    runs = {v: [r for j, r in zip(jobs, rs) if j["variant"] == v] for v in VARIANTS}
    early = {v: statistics.fmean(r["early_loss"] for r in runs[v]) for v in VARIANTS}
    final = {v: statistics.fmean(r["final"]["test_acc"] for r in runs[v]) for v in VARIANTS}
    summary = {f"{LABELS[v]}: early training loss (first {EARLY:.0%})": round(early[v], 4) for v in VARIANTS}
    summary.update({f"{LABELS[v]}: final test acc": round(final[v], 4) for v in VARIANTS})
    return {"steps": steps, "seeds": seeds, "early_fraction": EARLY, "early_loss": early, "final_test_acc": final,
            "runs": {v: [{"steps": r["steps"], "test_acc": r["test_acc"], "loss_curve": r["loss_curve"]}
                         for r in runs[v]] for v in VARIANTS}, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    e, f = n["early_loss"], n["final_test_acc"]
    text = (f"early training loss WN {e['wn']:.3f} vs plain {e['plain']:.3f} (BN {e['bn']:.3f}); final test "
            f"accuracy WN + mean-only BN {f['wn_mbn']:.3f} vs plain {f['plain']:.3f} (WN {f['wn']:.3f}, "
            f"BN {f['bn']:.3f})")
    if max(f.values()) < 0.3:
        return "inconclusive", "no version learned much: " + text
    fast, better = e["wn"] < e["plain"], f["wn_mbn"] > f["plain"]
    if fast and better:
        return "reproduced", text
    failed = [w for w, ok in (("WN did not speed early training", fast),
                              ("WN + mean-only BN did not beat plain", better)) if not ok]
    return "not reproduced", "; ".join(failed) + ": " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    colours = {"plain": "tab:blue", "bn": "tab:red", "wn": "tab:green", "wn_mbn": "tab:purple"}
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for v in VARIANTS:
        for i, r in enumerate(n["runs"][v]):
            kw = dict(color=colours[v], alpha=1 if i == 0 else 0.35, label=LABELS[v] if i == 0 else None)
            chunk = n["steps"] * n["early_fraction"]
            ax1.plot([chunk * (k + 0.5) for k in range(len(r["loss_curve"]))], r["loss_curve"], **kw)
            ax2.plot(r["steps"], r["test_acc"], **kw)
    ax1.set(xlabel="training step", ylabel=f"training loss (mean over {n['early_fraction']:.0%} of the steps)",
            yscale="log", title="training loss")
    ax2.set(xlabel="training step", ylabel="test accuracy", title="test accuracy (MNIST-1D MLP)")
    ax1.legend(fontsize=8)


EXPERIMENT = Experiment(
    name="weight_norm",
    title="Weight Normalization speeds early training; WN + mean-only BN beats plain",
    finding="Weight Normalization with data-dependent initialization speeds up early training compared to the "
            "plain parametrization, and WN combined with mean-only BatchNorm ends better than the plain net.",
    criterion=f"Mean training loss over the first {EARLY:.0%} of the steps: WN < plain; final test accuracy "
              "(mean over seeds): WN + mean-only BN > plain.",
    source="Salimans & Kingma 2016, sec. 2-3 and fig. 1 (CIFAR-10); here MNIST-1D, MLP, Adam",
    run=run, judge=judge, plot=plot, requires=("weight_norm", "data_dependent_init", "mbn1d"), figsize=(12.0, 4.2),
)
