"""Which population statistics should BN use at inference?

A BN MLP (3 hidden layers of 128, ReLU) on MNIST-1D (flattened), SGD with momentum, trained at a large and
a small batch size. During training, forward pre-hooks read every BN layer's mini-batch statistics
(mean, unbiased variance ``m/(m-1)`` as torch stores them) and keep several estimates side by side -- the
training trajectory does not depend on them, so one run serves all:

- ``ema m`` -- torch's exponential moving average ``r <- (1 - m) r + m * batch`` for several momenta;
- ``cumulative`` -- the plain average of every batch's statistics (``momentum=None``);
- ``pooled`` -- after training, the statistics of the whole training set computed in one pass (each layer
  sees its input normalized by the layers before it with their own whole-set statistics), the
  "recompute over the training set" / precise-BN estimate.

Each estimate is loaded into the BN layers in turn and the test accuracy measured. The module's own
running statistics (momentum 0.1) are checked against the ``ema 0.1`` estimate.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch

from .. import data as lab_data
from ..models import MLP, norm_layers
from ..runner import Context, Experiment
from ..train import evaluate, fit, seeded

MOMENTA = (0.01, 0.1, 0.5)


def _batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims).detach(), x.var(dims, unbiased=True).detach()


def train_one(batch_size: int, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.mnist1d().flat()
    seeded(seed)
    net = MLP(d.num_features, [128] * 3, d.num_classes, activation="relu", norm="bn")
    bns = norm_layers(net)
    est: Dict[str, List[List[torch.Tensor]]] = {}
    for m in MOMENTA:
        est[f"ema {m}"] = [[torch.zeros(b.num_features), torch.ones(b.num_features)] for b in bns]
    cum = [[torch.zeros(b.num_features), torch.zeros(b.num_features)] for b in bns]
    count = [0]

    def make_hook(i: int):
        def hook(module: torch.nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
            if not module.training:
                return
            mean, var = _batch_stats(args[0])
            for m in MOMENTA:
                e = est[f"ema {m}"][i]
                e[0].mul_(1 - m).add_(m * mean)
                e[1].mul_(1 - m).add_(m * var)
            cum[i][0].add_(mean)
            cum[i][1].add_(var)
            if i == 0:
                count[0] += 1
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(bns)]
    h = fit(net, d, steps=steps, batch_size=batch_size, lr=0.05, momentum=0.9, seed=seed)
    for hd in handles:
        hd.remove()
    own = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    check = max(float((o[0] - e[0]).abs().max()) for o, e in zip(own, est["ema 0.1"]))
    est["cumulative"] = [[c[0] / count[0], c[1] / count[0]] for c in cum]
    # pooled: the whole training set in one train-mode pass; with momentum 1 the buffers become its statistics
    saved = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 1.0
    with torch.no_grad():
        net.train()
        net(d.x_train)
    est["pooled"] = [[b.running_mean.clone(), b.running_var.clone()] for b in bns]
    for b, m in zip(bns, saved):
        b.momentum = m
    acc: Dict[str, float] = {}
    for name, values in est.items():
        with torch.no_grad():
            for b, (mean, var) in zip(bns, values):
                b.running_mean.copy_(mean)
                b.running_var.copy_(var)
        acc[name] = evaluate(net, d.x_test, d.y_test)["acc"]
    return {"acc": acc, "module_ema_check": check, "diverged": h.diverged}


def run(ctx: Context) -> Dict[str, Any]:
    sizes = (128, 8)
    steps = ctx.steps(500, 3000)
    seeds = ctx.thin([ctx.seed + i for i in range(ctx.pick(2, 5))], minimum=1)
    jobs = [dict(batch_size=b, seed=s, steps=steps) for b in sizes for s in seeds]
    rs = ctx.map(train_one, jobs)
    names = [f"ema {m}" for m in MOMENTA] + ["cumulative", "pooled"]
    acc = {str(b): {n: sum(r["acc"][n] for j, r in zip(jobs, rs) if j["batch_size"] == b) / len(seeds)
                    for n in names} for b in sizes}
    best = {b: max(a, key=a.get) for b, a in acc.items()}
    summary: Dict[str, Any] = {f"batch {b}: test acc by estimate": {n: round(v, 4) for n, v in a.items()}
                               for b, a in acc.items()}
    summary.update({f"batch {b}: best estimate": best[b] for b in acc})
    summary["max |module running_mean - ema 0.1| (check)"] = max(r["module_ema_check"] for r in rs)
    return {"batch_sizes": list(sizes), "steps": steps, "seeds": seeds, "n_test": len(lab_data.mnist1d().y_test), "estimates": names, "acc": acc,
            "per_seed": [dict(j, **r) for j, r in zip(jobs, rs)], "best": best, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    parts, verdicts = [], []
    for b, a in n["acc"].items():
        others = {k: v for k, v in a.items() if k != "pooled"}
        top = max(others, key=others.get)
        p = others[top]
        se = math.sqrt(max(p * (1 - p), 1e-12) / (n["n_test"] * len(n["seeds"])))  # binomial s.e. of an accuracy
        parts.append(f"batch {b}: pooled {a['pooled']:.4f}, best running estimate {top} {p:.4f}, "
                     f"worst {min(a, key=a.get)} {min(a.values()):.4f} (s.e. {se:.4f})")
        gap = p - a["pooled"]
        verdicts.append("reproduced" if gap <= se else "not reproduced" if gap > 2 * se else "inconclusive")
    text = "; ".join(parts)
    if max(max(a.values()) for a in n["acc"].values()) < 0.2:
        return "inconclusive", "no estimate gave better than near-chance accuracy: " + text
    for v in ("not reproduced", "inconclusive"):
        if v in verdicts:
            return v, text
    return "reproduced", text


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 1, 1)
    names = n["estimates"]
    width = 0.8 / len(n["acc"])
    for k, (b, a) in enumerate(n["acc"].items()):
        xs = [i + k * width for i in range(len(names))]
        bars = ax.bar(xs, [a[x] for x in names], width=width, label=f"batch size {b}")
        for x, rect in zip(names, bars):
            ax.annotate(f"{a[x]:.3f}", (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(n["acc"]) - 1) / 2 for i in range(len(names))], names)
    lo = min(min(a.values()) for a in n["acc"].values())
    ax.set(ylabel="test accuracy (eval mode)", ylim=(max(0.0, lo - 0.1), 1.0),
           title="BN population-statistics estimates at inference")
    ax.legend()


EXPERIMENT = Experiment(
    name="inference_stats",
    title="Inference statistics: moving averages vs the cumulative average vs recomputed population statistics",
    finding="Recomputing the population statistics over the training set with the final weights (pooled) is "
            "at least as good as any running estimate (EMA of any momentum, or the cumulative average of all "
            "batches); the running estimates lose most at small batch sizes.",
    criterion="At batch sizes 128 and 8, the pooled estimate's test accuracy is at most one standard error (binomial, "
              "over the test set) below the best running estimate (EMA 0.01/0.1/0.5, cumulative), or above it; more "
              "than two standard errors below is 'not reproduced', in between 'inconclusive'.",
    source="seeds 000/001 (storing every batch's statistics), torch's momentum=None, fvcore's precise BN",
    run=run, judge=judge, plot=plot, figsize=(10.0, 4.2),
)
