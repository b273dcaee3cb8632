"""Switchable Normalization (Luo et al. 2018): does the learned weight of the BN statistics fall as the batch shrinks?

The conv net of the batch-size experiment on MNIST-1D with Switchable Norm (``switch1d``) in every stage,
trained at several batch sizes (same protocol: equal steps). After training, each layer's mixing weights --
``softmax`` of its mean and variance logits, read from the module's ``mean_weight``/``var_weight`` (order IN,
LN, BN) -- give the importance of the BN statistics; the summary averages mean and variance weights over
the layers.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..models import norm_layers
from ..runner import Context, Experiment
from .batch_size import train_conv

ORDER = ("in", "ln", "bn")


def _order(module: torch.nn.Module) -> Tuple[str, ...]:
    try:
        from normzoo.nn.switchable import SWITCH_ORDER
        return tuple(SWITCH_ORDER)
    except ImportError:
        return ORDER


def train_one(batch_size: int, seed: int, steps: int) -> Dict[str, Any]:
    r = train_conv("sn", batch_size, seed, steps)
    layers = norm_layers(r["model"])
    order = _order(layers[0])
    weights: Dict[str, List[Dict[str, float]]] = {"mean": [], "var": []}
    for m in layers:
        for kind in weights:
            w = getattr(m, f"{kind}_weight").detach()
            weights[kind].append({name: float(w[i]) for i, name in enumerate(order)})
    return {"weights": weights, "test_acc": r["test_acc"]}


def run(ctx: Context) -> Dict[str, Any]:
    sizes = ctx.thin(ctx.pick([2, 8, 32], [2, 4, 8, 16, 32]), minimum=2)
    steps = ctx.steps(400, 1500, minimum=10)
    rs = ctx.map(train_one, [dict(batch_size=b, seed=ctx.seed, steps=steps) for b in sizes])
    importance: List[float] = []
    per_layer: Dict[str, Any] = {}
    for b, r in zip(sizes, rs):
        vals = [w["bn"] for kind in ("mean", "var") for w in r["weights"][kind]]
        importance.append(sum(vals) / len(vals))
        per_layer[str(b)] = r["weights"]
    summary = {f"BN importance (mean of mean/var weights over layers) at batch {sizes}": [round(x, 4) for x in importance],
               f"test acc at batch {sizes}": [round(r["test_acc"], 4) for r in rs]}
    return {"batch_sizes": sizes, "steps": steps, "bn_importance": importance,
            "weights": per_layer, "test_acc": [r["test_acc"] for r in rs], "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    imp, sizes = n["bn_importance"], n["batch_sizes"]
    text = ", ".join(f"batch {b}: {x:.3f}" for b, x in zip(sizes, imp)) + " (BN weight; 1/3 at initialization)"
    if max(n["test_acc"]) < 0.3:
        return "inconclusive", "the nets learned little: " + text
    return ("reproduced" if imp[0] < imp[-1] else "not reproduced"), "importance of the BN statistics " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    sizes = n["batch_sizes"]
    for i, kind in enumerate(("mean", "var")):
        ax = fig.add_subplot(1, 2, i + 1)
        for stat, colour in zip(ORDER, ("tab:green", "tab:orange", "tab:blue")):
            layers = len(n["weights"][str(sizes[0])][kind])
            for layer in range(layers):
                ys = [n["weights"][str(b)][kind][layer][stat] for b in sizes]
                ax.plot(sizes, ys, "o-", color=colour, alpha=1 - 0.25 * layer,
                        label=f"{stat.upper()} (layers 1-{layers}, fainter = deeper)" if layer == 0 else None)
        ax.axhline(1 / 3, color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set(xlabel="batch size", ylabel=f"softmax weight of the {kind}", ylim=(0, 1),
               title=f"Switchable Norm: importance of each {kind}")
        ax.legend(fontsize=7)


EXPERIMENT = Experiment(
    name="switchable",
    title="Switchable Norm learns to rely less on batch statistics at small batches",
    finding="The learned importance of the BN statistics in Switchable Normalization falls as the batch shrinks.",
    criterion="The BN mixing weight (averaged over layers and over mean/variance) at the smallest batch is below "
              "that at batch 32.",
    source="Luo, Ren, Peng, Zhang & Li 2018, fig. 1 and sec. 4",
    run=run, judge=judge, plot=plot, requires=("switch1d",), figsize=(12.0, 4.2),
)
