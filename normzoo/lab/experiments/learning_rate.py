"""A learning-rate sweep with and without BN: BN keeps training at rates where the plain net fails.

A ReLU MLP with 4 hidden layers of 100 on the digits, plain SGD (no momentum), batch 64, torch's default
initialization, learning rates ``logspace(-2.5, 1.5)``. At each rate a run is classified as *trains*
(final test accuracy >= :data:`TRAINS`), *diverged* (non-finite or exploding loss) or *stalled*.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from .. import data as lab_data
from ..models import MLP, log_range
from ..runner import Context, Experiment
from ..train import fit, seeded

TRAINS = 0.8
MIN_EXTRA = 2  # BN must train at >= this many rates where the plain net diverges or stalls


def train_one(norm: str, lr: float, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.digits()
    seeded(seed)
    net = MLP(d.num_features, [100] * 4, d.num_classes, activation="relu", norm=norm)
    h = fit(net, d, steps=steps, batch_size=64, lr=lr, seed=seed)
    return {"test_acc": h.final["test_acc"], "train_loss": h.final["train_loss"], "diverged": h.diverged,
            "steps_done": h.steps_done}


def _status(r: Dict[str, Any]) -> str:
    if r["diverged"]:
        return "diverged"
    return "trains" if r["test_acc"] >= TRAINS else "stalled"


def run(ctx: Context) -> Dict[str, Any]:
    lrs = ctx.thin(log_range(-2.5, 1.5, ctx.pick(9, 17)))
    steps = ctx.steps(200, 1500)
    jobs = [dict(norm=n, lr=lr, seed=ctx.seed, steps=steps) for n in ("none", "bn") for lr in lrs]
    rs = ctx.map(train_one, jobs)
    out: Dict[str, Any] = {"lrs": lrs, "steps": steps, "runs": {}}
    for label, norm in (("plain", "none"), ("bn", "bn")):
        sub = [r for j, r in zip(jobs, rs) if j["norm"] == norm]
        out["runs"][label] = {"test_acc": [r["test_acc"] for r in sub], "train_loss": [r["train_loss"] for r in sub],
                              "status": [_status(r) for r in sub]}
    extra = [lr for lr, a, b in zip(lrs, out["runs"]["bn"]["status"], out["runs"]["plain"]["status"])
             if a == "trains" and b != "trains"]
    out["bn_only_lrs"] = extra
    out["summary"] = {
        **{f"{k}: trains at": [f"{lr:.3g}" for lr, s in zip(lrs, out["runs"][k]["status"]) if s == "trains"]
           for k in ("plain", "bn")},
        **{f"{k}: diverged at": [f"{lr:.3g}" for lr, s in zip(lrs, out["runs"][k]["status"]) if s == "diverged"]
           for k in ("plain", "bn")},
        "rates where only BN trains": [f"{lr:.3g}" for lr in extra],
    }
    return out


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    count = {k: n["runs"][k]["status"].count("trains") for k in ("plain", "bn")}
    extra = n["bn_only_lrs"]
    plain_only = sum(1 for a, b in zip(n["runs"]["bn"]["status"], n["runs"]["plain"]["status"])
                     if b == "trains" and a != "trains")
    text = (f"BN trains at {count['bn']} of {len(n['lrs'])} learning rates, the plain net at {count['plain']}; "
            f"BN alone at {len(extra)} ({', '.join(f'{x:.3g}' for x in extra) or 'none'}), the plain net alone at "
            f"{plain_only}")
    if count["bn"] == 0:
        return "inconclusive", "BN trained at no learning rate: " + text
    if len(extra) >= MIN_EXTRA and count["bn"] > count["plain"]:
        return "reproduced", text
    return "not reproduced", text


def plot(n: Dict[str, Any], fig: Any) -> None:
    markers = {"trains": "o", "stalled": "s", "diverged": "x"}
    for i, key in enumerate(("test_acc", "train_loss")):
        ax = fig.add_subplot(1, 2, i + 1)
        for label, name, colour in (("plain", "without BN", "tab:blue"), ("bn", "with BN", "tab:red")):
            r = n["runs"][label]
            ys = [(y if y is not None else float("nan")) for y in r[key]]
            if key == "test_acc":
                ys = [0.1 if s == "diverged" else y for s, y in zip(r["status"], ys)]
            ax.semilogx(n["lrs"], ys, "-", color=colour, label=name, alpha=0.6)
            for status, m in markers.items():
                pts = [(x, y) for x, y, s in zip(n["lrs"], ys, r["status"]) if s == status]
                if pts:
                    ax.scatter(*zip(*pts), marker=m, color=colour, s=36,
                               label=f"{name}: {status}" if key == "test_acc" else None)
        ax.set(xlabel="learning rate (SGD)", title="final test accuracy (diverged drawn at chance)"
               if key == "test_acc" else "final training loss (diverged runs omitted)")
        if key == "test_acc":
            ax.axhline(TRAINS, color="grey", ls=":", lw=1)
            ax.legend(fontsize=7)
        else:
            ax.set_yscale("log")


EXPERIMENT = Experiment(
    name="learning_rate",
    title="BN widens the range of usable learning rates",
    finding="With BN an MLP trains at learning rates where the same net without BN diverges or stalls.",
    criterion=f"A run trains when its final test accuracy is >= {TRAINS:.0%}; BN must train at more learning "
              f"rates than the plain net, including >= {MIN_EXTRA} where the plain net diverges or stalls.",
    source="Ioffe & Szegedy 2015, sec. 3.3 (higher learning rates); here digits, 4x100 ReLU MLP, SGD",
    run=run, judge=judge, plot=plot, figsize=(12.0, 4.2),
)
