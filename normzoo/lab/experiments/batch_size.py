"""Batch size: BN degrades as the batch shrinks, GroupNorm and LayerNorm do not.

A 1-D conv net (:class:`normzoo.lab.models.ConvNet1d`) on MNIST-1D with BN, GN (8 groups), LN (statistics
over channels and length) and IN -- and Batch Renorm, Cross-Iteration BN and Switchable Norm once normzoo
provides them -- trained at several batch sizes for the same number of epochs (as the GroupNorm paper
does), with Adam and the learning rate scaled by ``sqrt(B / 32)``.

Ghost batches isolate the statistics: the batch is fixed at 32 (same steps, same learning rate, same
gradient noise) and BN's statistics are computed over groups of ``g`` samples inside it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .. import data as lab_data
from ..models import ConvNet1d, layer_source, registry_name
from ..runner import Context, Experiment
from ..train import fit, seeded

BASE_LR = 3e-3
DROP = 0.05          # BN must lose at least this much test accuracy from the largest to the smallest batch
STEADY_RATIO = 0.5   # GN and LN must lose at most this fraction of BN's loss
CORE = ("bn", "gn", "ln", "in")
LATER = ("brn", "cbn", "sn")
LABELS = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "in": "InstanceNorm", "brn": "Batch Renorm",
          "cbn": "Cross-Iteration BN", "sn": "Switchable Norm"}


def train_one(norm: str, batch_size: int, ghost: int, seed: int, n_train: int, epochs: int,
              fixed_steps: int = 0) -> Dict[str, Any]:
    d = lab_data.mnist1d().subset(n_train)
    seeded(seed)
    net = ConvNet1d(norm, ghost_group=ghost or None)
    steps = fixed_steps or epochs * n_train // batch_size
    h = fit(net, d, steps=steps, batch_size=batch_size, lr=BASE_LR * (batch_size / 32) ** 0.5, optimizer="adam",
            seed=seed)
    return {"test_acc": h.final["test_acc"], "train_acc": h.final["train_acc"], "diverged": h.diverged,
            "steps": steps}


def available_norms() -> List[str]:
    return list(CORE) + [k for k in LATER if layer_source(registry_name(k, True)) is not None]


def run(ctx: Context) -> Dict[str, Any]:
    sizes = ctx.pick([2, 8, 32], [2, 4, 8, 16, 32])
    n_train = ctx.pick(1000, 2000)
    epochs = max(1, int(round(ctx.pick(3, 4) * ctx.scale)))
    if ctx.scale < 1:
        n_train = max(200, int(n_train * ctx.scale))
    norms = available_norms()
    seed = ctx.seed
    jobs = [dict(norm=k, batch_size=b, ghost=0, seed=seed, n_train=n_train, epochs=epochs) for k in norms
            for b in sizes]
    ghosts = [g for g in sizes if g < 32]
    big_steps = epochs * n_train // 32
    jobs += [dict(norm="bn", batch_size=32, ghost=g, seed=seed, n_train=n_train, epochs=epochs,
                  fixed_steps=big_steps) for g in ghosts]
    rs = ctx.map(train_one, jobs)
    acc: Dict[str, List[float]] = {k: [] for k in norms}
    ghost_acc: Dict[str, float] = {}
    for j, r in zip(jobs, rs):
        if j["ghost"]:
            ghost_acc[str(j["ghost"])] = r["test_acc"]
        else:
            acc[j["norm"]].append(r["test_acc"])
    ghost_acc["32"] = acc["bn"][sizes.index(32)]
    sources = {k: layer_source(registry_name(k, True)) for k in norms}
    summary: Dict[str, Any] = {f"{LABELS[k]}: test acc at batch {sizes}": [round(a, 4) for a in acc[k]]
                               for k in norms}
    summary[f"BN with ghost batches of g inside batch 32, g = {ghosts + [32]}"] = [
        round(ghost_acc[str(g)], 4) for g in ghosts + [32]]
    return {"batch_sizes": sizes, "n_train": n_train, "epochs": epochs, "norms": norms, "acc": acc,
            "ghost_groups": ghosts + [32], "ghost_acc": [ghost_acc[str(g)] for g in ghosts + [32]],
            "sources": sources, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    acc = n["acc"]
    drop = {k: v[-1] - v[0] for k, v in acc.items()}
    small = n["batch_sizes"][0]
    text = (f"from batch {n['batch_sizes'][-1]} to {small} the test accuracy changes by "
            + ", ".join(f"{LABELS[k]} {-drop[k]:+.3f}" for k in acc)
            + f"; at batch {small}: GN {acc['gn'][0]:.3f} vs BN {acc['bn'][0]:.3f}; ghost batches of "
              f"{n['ghost_groups'][0]}: {n['ghost_acc'][0]:.3f} vs {n['ghost_acc'][-1]:.3f} with whole-batch statistics")
    if max(max(v) for v in acc.values()) < 0.3:
        return "inconclusive", "no model learned much (too few steps): " + text
    degrades = drop["bn"] >= DROP
    steady = all(drop[k] <= STEADY_RATIO * max(drop["bn"], 0.0) for k in ("gn", "ln"))
    gn_wins = acc["gn"][0] > acc["bn"][0]
    if degrades and steady and gn_wins:
        return "reproduced", text
    failed = [w for w, ok in ((f"BN lost less than {DROP:.0%}", degrades),
                              ("GN or LN lost more than half of what BN lost", steady),
                              (f"GN did not beat BN at batch {small}", gn_wins)) if not ok]
    return "not reproduced", "; ".join(failed) + ": " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 2, 1)
    for k in n["norms"]:
        ax.plot(n["batch_sizes"], n["acc"][k], "o-", label=LABELS[k], lw=2.5 if k in ("bn", "gn") else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n["batch_sizes"], [str(b) for b in n["batch_sizes"]])
    ax.set(xlabel="batch size (same epochs)", ylabel="test accuracy",
           title=f"MNIST-1D conv net, {n['epochs']} epochs of {n['n_train']}")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(n["ghost_groups"], n["ghost_acc"], "o-", color="tab:blue", label="BN, ghost batches")
    gn32 = n["acc"]["gn"][n["batch_sizes"].index(32)]
    ax.axhline(gn32, color="tab:orange", ls="--", label="GroupNorm at batch 32")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n["ghost_groups"], [str(g) for g in n["ghost_groups"]])
    ax.set(xlabel="samples per BN statistics group (batch fixed at 32)", ylabel="test accuracy",
           title="ghost batches: only the statistics shrink")
    ax.legend(fontsize=8)


EXPERIMENT = Experiment(
    name="batch_size",
    title="Small batches hurt BN but not GroupNorm or LayerNorm",
    finding="BN's accuracy degrades as the batch shrinks; GroupNorm and LayerNorm barely move; GroupNorm beats "
            "BN at the smallest batches. Ghost batches (BN statistics over small groups inside a fixed batch) "
            "show that the statistics alone cause it.",
    criterion=f"Same epochs at every batch size: BN loses >= {DROP:.0%} test accuracy from batch 32 to batch 2, "
              f"GN and LN lose at most {STEADY_RATIO} x what BN loses, and GN beats BN at batch 2.",
    source="CS231n assignment 2 (batch size experiment); Wu & He 2018 (GroupNorm), fig. 1",
    run=run, judge=judge, plot=plot, figsize=(12.0, 4.2),
)
