"""Batch-Instance Normalization (Nam & Kim 2018) on data with a per-sample style nuisance.

MNIST-1D with every sequence multiplied by a random gain and shifted by a random offset (the 1-D analogue
of contrast and brightness; :func:`normzoo.lab.data.styled`). The conv net is trained with BN and with
BIN (``bin1d``; gates ``rho`` with 10 x the learning rate, as in the paper), batch 32, Adam. ``rho`` is the
weight of the batch-normalized branch (``rho = 1`` is BN, ``0`` is IN); it starts at 1.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Tuple

from .. import data as lab_data
from ..models import ConvNet1d, norm_layers
from ..runner import Context, Experiment
from ..train import fit, seeded

LR = 3e-3


def train_one(norm: str, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.styled()
    seeded(seed)
    net = ConvNet1d(norm)
    groups = None
    if norm == "bin":
        try:
            from normzoo.nn.batch_instance import bin_param_groups
            groups = bin_param_groups(net, lr=LR)
        except ImportError:
            groups = None
    h = fit(net, d, steps=steps, batch_size=32, lr=LR, optimizer="adam", seed=seed, param_groups=groups,
            eval_every=max(1, steps // 25))
    rho: List[List[float]] = []
    if norm == "bin":
        rho = [[float(v) for v in m.rho.detach().clamp(0, 1)] for m in norm_layers(net)]
    return {"steps": h.steps, "test_acc": h.test_acc, "final": h.final, "rho": rho}


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(400, 3000, minimum=10)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    jobs = [dict(norm=k, seed=s, steps=steps) for k in ("bn", "bin", "in") for s in seeds]
    rs = ctx.map(train_one, jobs)
    runs = {k: [r for j, r in zip(jobs, rs) if j["norm"] == k] for k in ("bn", "bin", "in")}
    acc = {k: statistics.fmean(r["final"]["test_acc"] for r in v) for k, v in runs.items()}
    rho_layers = [statistics.fmean(statistics.fmean(r["rho"][i]) for r in runs["bin"])
                  for i in range(len(runs["bin"][0]["rho"]))]
    summary = {"test acc BN / BIN / IN": [round(acc[k], 4) for k in ("bn", "bin", "in")],
               "BIN: mean gate rho per layer (1 = BN, 0 = IN)": [round(x, 3) for x in rho_layers]}
    return {"steps": steps, "seeds": seeds, "acc": acc, "rho_layers": rho_layers,
            "rho_first_layer": runs["bin"][0]["rho"][0],
            "curves": {k: [{"steps": r["steps"], "test_acc": r["test_acc"]} for r in v] for k, v in runs.items()},
            "data": lab_data.styled.__doc__.split("\n")[0], "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    acc, rho = n["acc"], n["rho_layers"]
    text = (f"test accuracy BIN {acc['bin']:.3f} vs BN {acc['bn']:.3f} (IN {acc['in']:.3f}); mean gate rho of the "
            f"first layer {rho[0]:.2f}, deeper layers {', '.join(f'{r:.2f}' for r in rho[1:])}")
    if max(acc.values()) < 0.3:
        return "inconclusive", "the nets learned little: " + text
    ok = acc["bin"] > acc["bn"] and rho[0] < 0.5
    failed = [w for w, c in (("BIN did not beat BN", acc["bin"] > acc["bn"]),
                             ("the first layer's gate did not lean to instance statistics", rho[0] < 0.5)) if not c]
    return ("reproduced", text) if ok else ("not reproduced", "; ".join(failed) + ": " + text)


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 2, 1)
    for k, colour, label in (("bn", "tab:blue", "BN"), ("bin", "tab:red", "BIN"), ("in", "tab:green", "IN")):
        for i, c in enumerate(n["curves"][k]):
            ax.plot(c["steps"], c["test_acc"], color=colour, alpha=1 if i == 0 else 0.35, label=label if i == 0 else None)
    ax.set(xlabel="training step", ylabel="test accuracy", title="MNIST-1D with random gain and offset per sample")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    ax.hist(n["rho_first_layer"], bins=20, range=(0, 1), color="tab:red", alpha=0.7, label="first layer, per channel")
    for i, r in enumerate(n["rho_layers"]):
        ax.axvline(r, color="black", ls=["-", "--", ":"][i % 3], label=f"layer {i + 1} mean {r:.2f}")
    ax.set(xlabel="gate rho (0 = instance statistics, 1 = batch statistics)", ylabel="channels",
           title="BIN gates after training")
    ax.legend(fontsize=8)


EXPERIMENT = Experiment(
    name="batch_instance",
    title="Batch-Instance Norm removes a per-sample style nuisance",
    finding="On data whose samples carry a random 'style' (gain and offset), Batch-Instance Normalization beats "
            "BatchNorm, and the first layer's gates lean towards instance statistics.",
    criterion="Final test accuracy BIN > BN, and the mean gate rho of the first BIN layer < 0.5 (nearer IN than BN).",
    source="Nam & Kim 2018, sec. 3-4 (style-invariant classification)",
    run=run, judge=judge, plot=plot, requires=("bin1d",), figsize=(12.0, 4.2),
)
