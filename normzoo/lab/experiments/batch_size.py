"""Batch size: BN degrades as the batch shrinks, GroupNorm and LayerNorm do not.

A 1-D conv net (:class:`normzoo.lab.models.ConvNet1d`) on MNIST-1D with BN, GN (8 groups), LN (statistics
over channels and length) and IN -- in ``--full`` also Batch Renorm, Cross-Iteration BN and Switchable Norm
once normzoo provides them -- trained at several batch sizes for the same number of steps with Adam and
the learning rate scaled by ``sqrt(B / 32)``.

Protocol. The GroupNorm paper trains every batch size for the same number of epochs; on two CPU cores
that makes the small batches 16x as expensive, so here every batch size gets the same number of *steps*.
Small batches then see fewer samples and every method loses some accuracy from that alone; what the
claim is about is how much *more* BN loses than the batch-independent methods (GN, LN), which see exactly
the same samples. Ghost batches isolate the statistics completely: the batch is fixed at 32 (same
samples, steps, learning rate and gradient noise) and BN's statistics are computed over groups of ``g``
samples inside it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .. import data as lab_data
from ..models import ConvNet1d, layer_source, registry_name
from ..runner import Context, Experiment
from ..train import fit, seeded

BASE_LR = 3e-3
EXCESS = 0.05        # BN must lose at least this much more test accuracy than GN and LN (batch 32 -> 2)
CORE = ("bn", "gn", "ln", "in")
LATER = ("brn", "cbn", "sn")
LABELS = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm", "in": "InstanceNorm", "brn": "Batch Renorm",
          "cbn": "Cross-Iteration BN", "sn": "Switchable Norm"}


def lr_for(batch_size: int) -> float:
    """Adam's learning rate at ``batch_size``: ``BASE_LR * sqrt(batch_size / 32)``."""
    return BASE_LR * (batch_size / 32) ** 0.5


def train_conv(norm: str, batch_size: int, seed: int, steps: int, ghost: int = 0, eval_every: int = 0,
               norm_kwargs: Any = None) -> Dict[str, Any]:
    """The conv net with ``norm`` on MNIST-1D for ``steps`` steps at ``batch_size`` (shared by several experiments)."""
    d = lab_data.mnist1d()
    seeded(seed)
    net = ConvNet1d(norm, ghost_group=ghost or None, norm_kwargs=norm_kwargs)
    on_step = None
    if norm == "brn":
        on_step = _renorm_schedule(net, steps)
    h = fit(net, d, steps=steps, batch_size=batch_size, lr=lr_for(batch_size), optimizer="adam", seed=seed,
            eval_every=eval_every or None, on_step=on_step)
    return {"test_acc": h.final["test_acc"], "train_acc": h.final["train_acc"], "diverged": h.diverged,
            "steps": steps, "curve": {"steps": h.steps, "test_acc": h.test_acc}, "model": net}


def _renorm_schedule(net: Any, steps: int) -> Any:
    """Batch Renorm's warm-up scaled to the run: plain BN for 5% of the steps, then r_max -> 3, d_max -> 5."""
    try:
        from normzoo.nn.renorm import RenormSchedule
    except ImportError:  # the layers keep their constructor limits
        return None
    start = steps // 20
    sched = RenormSchedule(net, r_steps=(start, max(start, steps // 2)), d_steps=(start, max(start, steps // 3)))
    return lambda step, model, loss: sched.step()


def train_one(norm: str, batch_size: int, ghost: int, seed: int, steps: int) -> Dict[str, Any]:
    kw = {"burn_in": max(4, steps // 20)} if norm == "cbn" else None  # the paper's burn-in, scaled to the run
    r = train_conv(norm, batch_size, seed, steps, ghost=ghost, norm_kwargs=kw)
    return {k: r[k] for k in ("test_acc", "train_acc", "diverged", "steps")}


def available_norms(full: bool) -> List[str]:
    later = [k for k in LATER if layer_source(registry_name(k, True)) is not None] if full else []
    return list(CORE) + later


def run(ctx: Context) -> Dict[str, Any]:
    sizes = ctx.thin(ctx.pick([2, 32], [2, 4, 8, 16, 32]), minimum=2)
    steps = ctx.steps(400, 1500, minimum=10)
    norms = available_norms(full=not ctx.quick)
    jobs = [dict(norm=k, batch_size=b, ghost=0, seed=ctx.seed, steps=steps) for k in norms for b in sizes]
    ghosts = [g for g in sizes if g < 32]
    jobs += [dict(norm="bn", batch_size=32, ghost=g, seed=ctx.seed, steps=steps) for g in ghosts]
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
    return {"batch_sizes": sizes, "steps": steps, "norms": norms, "acc": acc,
            "ghost_groups": ghosts + [32], "ghost_acc": [ghost_acc[str(g)] for g in ghosts + [32]],
            "sources": sources, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    acc = n["acc"]
    drop = {k: v[-1] - v[0] for k, v in acc.items()}
    small, big = n["batch_sizes"][0], n["batch_sizes"][-1]
    ghost_drop = n["ghost_acc"][-1] - n["ghost_acc"][0]
    text = (f"from batch {big} to {small} (same steps) the test accuracy changes by "
            + ", ".join(f"{LABELS[k]} {-drop[k]:+.3f}" for k in acc)
            + f"; at batch {small}: GN {acc['gn'][0]:.3f} vs BN {acc['bn'][0]:.3f}; ghost batches of "
              f"{n['ghost_groups'][0]}: {n['ghost_acc'][0]:.3f} vs {n['ghost_acc'][-1]:.3f} with whole-batch statistics")
    if max(max(v) for v in acc.values()) < 0.3:
        return "inconclusive", "no model learned much (too few steps): " + text
    excess = all(drop["bn"] - drop[k] >= EXCESS for k in ("gn", "ln"))
    gn_wins = acc["gn"][0] > acc["bn"][0]
    ghost = ghost_drop >= EXCESS
    if excess and gn_wins and ghost:
        return "reproduced", text
    failed = [w for w, ok in ((f"BN did not lose {EXCESS:.0%} more than GN and LN", excess),
                              (f"GN did not beat BN at batch {small}", gn_wins),
                              (f"ghost batches of {n['ghost_groups'][0]} cost BN less than {EXCESS:.0%}", ghost))
              if not ok]
    return "not reproduced", "; ".join(failed) + ": " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 2, 1)
    for k in n["norms"]:
        ax.plot(n["batch_sizes"], n["acc"][k], "o-", label=LABELS[k], lw=2.5 if k in ("bn", "gn") else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n["batch_sizes"], [str(b) for b in n["batch_sizes"]])
    ax.set(xlabel="batch size", ylabel="test accuracy", title=f"MNIST-1D conv net, {n['steps']} steps each")
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
    criterion=f"Same steps at every batch size: from batch 32 to batch 2 BN loses >= {EXCESS:.0%} more test "
              f"accuracy than GN and than LN, GN beats BN at batch 2, and BN with ghost batches of 2 inside a batch "
              f"of 32 loses >= {EXCESS:.0%} against whole-batch statistics.",
    source="CS231n assignment 2 (batch size experiment); Wu & He 2018 (GroupNorm), fig. 1",
    run=run, judge=judge, plot=plot, figsize=(12.0, 4.2),
)
