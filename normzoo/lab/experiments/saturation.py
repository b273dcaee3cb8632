"""Ioffe & Szegedy (2015), figure 1: BN speeds training and keeps a sigmoid's input distribution in place.

A 3 x 100 sigmoid MLP on the digits, plain SGD, with and without BN after every linear layer. Recorded at
each evaluation: test accuracy and the 15th/50th/85th percentiles (over the test set) of the input of
every sigmoid in the last hidden layer (for the BN net that input is the BN output).

Drift of a unit = the largest move of its three percentiles between an early point (5% of training) and the
end, divided by its 15-85 spread (the larger of the early and the final one); the net's drift is the median over the layer's 100 units.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import data as lab_data
from ..models import MLP
from ..runner import Context, Experiment
from ..train import fit, seeded, steps_to

THRESHOLD = 0.90
LR = 0.5
BATCH = 60
SPEEDUP = 0.5  # BN must need fewer than SPEEDUP x the plain net's steps
DRIFT_RATIO = 0.5  # ... and drift less than DRIFT_RATIO x as much


def train_one(norm: str, seed: int, steps: int) -> Dict[str, Any]:
    d = lab_data.digits()
    seeded(seed)
    net = MLP(d.num_features, [100, 100, 100], d.num_classes, activation="sigmoid", norm=norm)
    last = net.blocks[-1]
    qs = torch.tensor([0.15, 0.50, 0.85])
    pct: List[List[List[float]]] = []  # eval point -> quantile -> unit

    def on_eval(step: int, model: torch.nn.Module) -> None:
        captured = {}
        handle = last.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("z", o.detach()))
        was = model.training
        model.eval()
        with torch.no_grad():
            model(d.x_test)
        model.train(was)
        handle.remove()
        pct.append(torch.quantile(captured["z"], qs, dim=0).tolist())

    h = fit(net, d, steps=steps, batch_size=BATCH, lr=LR, seed=seed, eval_every=max(1, steps // 80), on_eval=on_eval)
    return {"history": h.to_dict(), "percentiles": pct}


def _drift(steps: List[int], pct: List[List[List[float]]]) -> Optional[float]:
    if len(steps) < 2:
        return None
    t0 = next((i for i, s in enumerate(steps) if s >= steps[-1] / 20 and s > 0), len(steps) - 1)
    early, end = torch.tensor(pct[t0]), torch.tensor(pct[-1])
    spread = torch.maximum(early[2] - early[0], end[2] - end[0]).clamp_min(1e-6)
    return float(((end - early).abs().max(dim=0).values / spread).median())


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(1500, 8000)
    seeds = [ctx.seed + i for i in range(ctx.pick(1, 3))]
    jobs = [dict(norm=n, seed=s, steps=steps) for n in ("none", "bn") for s in seeds]
    runs = ctx.map(train_one, jobs)
    out: Dict[str, Any] = {"threshold": THRESHOLD, "steps": steps, "lr": LR, "batch_size": BATCH,
                           "data": lab_data.digits().description, "seeds": seeds, "runs": {}}
    summary: Dict[str, Any] = {}
    for norm in ("none", "bn"):
        rs = [r for j, r in zip(jobs, runs) if j["norm"] == norm]
        reach = [steps_to(r["history"]["steps"], r["history"]["test_acc"], THRESHOLD) for r in rs]
        drifts = [_drift(r["history"]["steps"], r["percentiles"]) for r in rs]
        label = "bn" if norm == "bn" else "plain"
        out["runs"][label] = [{"steps": r["history"]["steps"], "test_acc": r["history"]["test_acc"],
                               "unit0_percentiles": [[p[q][0] for q in range(3)] for p in r["percentiles"]],
                               "final": r["history"]["final"], "steps_to_threshold": st, "drift": dr}
                              for r, st, dr in zip(rs, reach, drifts)]
        summary[f"{label}: steps to {THRESHOLD:.0%} test acc"] = reach
        summary[f"{label}: final test acc"] = [round(r["history"]["final"]["test_acc"], 4) for r in rs]
        summary[f"{label}: median percentile drift / 15-85 spread"] = drifts
    out["summary"] = summary
    return out


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    steps = n["steps"]
    worst_bn = [r["steps_to_threshold"] for r in n["runs"]["bn"]]
    plain = [r["steps_to_threshold"] for r in n["runs"]["plain"]]
    if any(s is None for s in worst_bn):
        return "inconclusive", f"the BN net did not reach {n['threshold']:.0%} test accuracy in {steps} steps"
    bn_steps = max(worst_bn)
    plain_steps = min((s if s is not None else steps + 1) for s in plain)
    plain_txt = f"{plain_steps}" if all(s is not None for s in plain) else f"> {steps} (never)"
    fast = bn_steps < SPEEDUP * plain_steps
    d_bn = [r["drift"] for r in n["runs"]["bn"]]
    d_plain = [r["drift"] for r in n["runs"]["plain"]]
    if any(d is None for d in d_bn + d_plain):
        return "inconclusive", "too few evaluation points to measure the drift"
    steady = max(d_bn) < DRIFT_RATIO * min(d_plain)
    text = (f"steps to {n['threshold']:.0%}: BN {bn_steps} vs plain {plain_txt}; percentile drift BN "
            f"{max(d_bn):.2f} vs plain {min(d_plain):.2f} (in 15-85 spreads)")
    if fast and steady:
        return "reproduced", text
    failed = [w for w, ok in (("BN was not twice as fast", fast), ("BN's sigmoid input drifted as much", steady))
              if not ok]
    return "not reproduced", f"{'; '.join(failed)}: {text}"


def plot(n: Dict[str, Any], fig: Any) -> None:
    ax = fig.add_subplot(1, 3, 1)
    for label, colour in (("plain", "tab:blue"), ("bn", "tab:red")):
        for i, r in enumerate(n["runs"][label]):
            ax.plot(r["steps"], r["test_acc"], color=colour, alpha=1 if i == 0 else 0.35,
                    label=("BN" if label == "bn" else "without BN") if i == 0 else None)
    ax.axhline(n["threshold"], color="grey", ls=":", lw=1)
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy", ylim=(0, 1.02))
    ax.legend(loc="lower right")
    for k, (label, name) in enumerate((("plain", "without BN"), ("bn", "with BN"))):
        ax = fig.add_subplot(1, 3, 2 + k)
        r = n["runs"][label][0]
        p = list(zip(*r["unit0_percentiles"]))
        ax.fill_between(r["steps"], p[0], p[2], color="tab:red" if label == "bn" else "tab:blue", alpha=0.2)
        for q, style in zip(p, (":", "-", ":")):
            ax.plot(r["steps"], q, color="black", ls=style, lw=1)
        ax.set(xlabel="training step", ylabel="sigmoid input",
               title=f"({'bc'[k]}) {name}: 15/50/85th percentiles")
    ymin = min(a.get_ylim()[0] for a in fig.axes[1:])
    ymax = max(a.get_ylim()[1] for a in fig.axes[1:])
    for a in fig.axes[1:]:
        a.set_ylim(ymin, ymax)


EXPERIMENT = Experiment(
    name="saturation",
    title="BN speeds training and stabilizes a sigmoid's input (BN paper, fig. 1)",
    finding="With BN a 3x100 sigmoid MLP reaches high test accuracy in far fewer SGD steps, and the "
            "15th/50th/85th percentiles of a last-layer sigmoid's input stay put, while without BN they drift.",
    criterion=f"BN reaches {THRESHOLD:.0%} test accuracy on the digits (the analogue of the paper's MNIST curve) "
              f"in fewer than {SPEEDUP} x the plain net's steps, and the median percentile drift of the last "
              f"layer's sigmoid inputs is below {DRIFT_RATIO} x the plain net's.",
    source="Ioffe & Szegedy 2015, fig. 1 (MNIST); here scikit-learn digits, SGD lr 0.5, batch 60",
    run=run, judge=judge, plot=plot, figsize=(13.0, 4.0),
)
