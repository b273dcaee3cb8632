"""Beyond the seeds: does BN reduce internal covariate shift, or does it smooth the loss?

Santurkar, Tsipras, Ilyas & Madry (2018) argue that BN's benefit is not a reduction of internal covariate
shift but a smoother optimization landscape. A ReLU MLP (4 hidden layers of 100) on the digits is trained
with SGD (lr 0.1, batch 64) with and without BN; every few steps, at the current weights ``theta`` with the
mini-batch gradient ``g``:

- **input shift** per layer (from the second linear layer on: the first one's input is the data): how much the distribution of each linear layer's input changes over one
  training step, on a fixed probe batch: ``mean_j |mu_j' - mu_j| + |s_j' - s_j|`` (per-feature mean and
  standard deviation, before and after the step), divided by ``mean_j s_j``;
- **ICS** per layer, the paper's definition: ``||G_i - G_i'||`` between the gradient of layer ``i`` at
  ``theta`` and at ``theta`` with only the layers before ``i`` updated, relative to ``||G_i||``; and the
  cosine between them;
- **loss variation**: the range of ``L(theta - eta g)`` over step sizes ``eta`` in ``lr x {0.25, ..., 4}``;
- **gradient predictiveness**: ``max_eta ||grad L(theta - eta g) - g||``;
- **effective beta-smoothness**: ``max_eta ||grad L(theta - eta g) - g|| / ||eta g||``.

All on the same mini-batch; for the BN net in training mode (batch statistics).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from .. import data as lab_data
from ..models import MLP
from ..runner import Context, Experiment
from ..train import fit, seeded

LR = 0.1
ETAS = (0.25, 0.5, 1.0, 2.0, 4.0)
MEASURES = ("loss_variation", "grad_predictiveness", "beta_smoothness")


def _grads(model: torch.nn.Module, params: List[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
           ) -> Tuple[float, List[torch.Tensor]]:
    loss = F.cross_entropy(model(xb), yb)
    gs = torch.autograd.grad(loss, params)
    return float(loss.detach()), [g.detach() for g in gs]


def _flat(ts: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _probe_stats(model: MLP, x: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    stats: List[Tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [lin.register_forward_pre_hook(lambda m, a: stats.append((a[0].mean(0), a[0].std(0))))
             for lin in model.linears()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stats


def measure(model: MLP, xb: torch.Tensor, yb: torch.Tensor, probe: torch.Tensor) -> Dict[str, Any]:
    """Every measure at the model's current weights (which are restored afterwards)."""
    params = [p for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss0, g = _grads(model, params, xb, yb)
    gflat = _flat(g)
    out: Dict[str, Any] = {}
    # loss landscape along the gradient
    losses, gdiff, beta = [], [], []
    for k in ETAS:
        with torch.no_grad():
            for p, s, gi in zip(params, saved, g):
                p.copy_(s - k * LR * gi)
        l_k, g_k = _grads(model, params, xb, yb)
        losses.append(l_k)
        diff = float((_flat(g_k) - gflat).norm())
        gdiff.append(diff)
        beta.append(diff / max(float(k * LR * gflat.norm()), 1e-12))
    out["loss_variation"] = max(losses + [loss0]) - min(losses + [loss0])
    out["grad_predictiveness"] = max(gdiff)
    out["beta_smoothness"] = max(beta)
    # ICS (gradient definition) per linear layer, and the probe input shift over one step
    lin_params = [(lin.weight, lin.bias) for lin in model.linears()]
    index = {id(p): i for i, p in enumerate(params)}
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    before = _probe_stats(model, probe)
    ics, cos = [], []
    for i, (w, _) in enumerate(lin_params):
        if i == 0:  # no layer before the first: its ICS is 0 by definition
            continue
        earlier = {id(t) for pair in lin_params[:i] for t in pair}
        with torch.no_grad():
            for p, s, gi in zip(params, saved, g):
                p.copy_(s - LR * gi if id(p) in earlier else s)
        _, g_i = _grads(model, params, xb, yb)
        a, b = g[index[id(w)]].reshape(-1), g_i[index[id(w)]].reshape(-1)
        ics.append(float((a - b).norm() / a.norm().clamp_min(1e-12)))
        cos.append(float(F.cosine_similarity(a, b, dim=0)))
    with torch.no_grad():
        for p, s, gi in zip(params, saved, g):
            p.copy_(s - LR * gi)
    after = _probe_stats(model, probe)
    out["input_shift"] = [float(((m1 - m0).abs().mean() + (s1 - s0).abs().mean()) / s0.mean().clamp_min(1e-12))
                          for (m0, s0), (m1, s1) in list(zip(before, after))[1:]]  # the data never shift
    out["ics"], out["ics_cosine"] = ics, cos
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    model.load_state_dict(state)
    out["loss"] = loss0
    return out


def train_one(norm: str, seed: int, steps: int, every: int) -> Dict[str, Any]:
    d = lab_data.digits()
    seeded(seed)
    net = MLP(d.num_features, [100] * 4, d.num_classes, activation="relu", norm=norm)
    probe = d.x_train[:256]
    points: List[Dict[str, Any]] = []

    def loss_fn(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if len(points) * every <= counter[0]:
            m = measure(model, xb, yb, probe)
            m["step"] = counter[0]
            points.append(m)
        counter[0] += 1
        return F.cross_entropy(model(xb), yb)

    counter = [0]
    h = fit(net, d, steps=steps, batch_size=64, lr=LR, seed=seed, loss_fn=loss_fn)
    return {"points": points, "final": h.final, "diverged": h.diverged}


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(400, 2000, minimum=6)
    every = max(1, steps // ctx.pick(20, 50))
    rs = ctx.map(train_one, [dict(norm=n, seed=ctx.seed, steps=steps, every=every) for n in ("none", "bn")])
    out: Dict[str, Any] = {"steps": steps, "lr": LR, "etas": list(ETAS), "runs": {}}
    summary: Dict[str, Any] = {}
    for label, r in zip(("plain", "bn"), rs):
        pts = r["points"]
        series = {k: [p[k] for p in pts] for k in ("step", "loss", *MEASURES, "input_shift", "ics", "ics_cosine")}
        out["runs"][label] = dict(series, final=r["final"])
        for k in MEASURES:
            summary[f"{label}: median {k.replace('_', ' ')}"] = statistics.median(series[k])
        layers = list(zip(*series["input_shift"]))
        summary[f"{label}: median input shift per step, linear layers 2-5"] = [round(statistics.median(v), 4) for v in layers]
        ics = list(zip(*series["ics"]))
        summary[f"{label}: median relative ICS (gradient change), linear layers 2-5"] = [round(statistics.median(v), 4)
                                                                              for v in ics]
        summary[f"{label}: final test acc"] = round(r["final"]["test_acc"], 4)
    out["summary"] = summary
    return out


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    med = {k: {lab: statistics.median(n["runs"][lab][k]) for lab in ("plain", "bn")} for k in MEASURES}
    smoother = [k for k in MEASURES if med[k]["bn"] < med[k]["plain"]]
    shift = {lab: statistics.median(sum(v) / len(v) for v in n["runs"][lab]["input_shift"]) for lab in ("plain", "bn")}
    text = ("; ".join(f"{k.replace('_', ' ')}: BN {med[k]['bn']:.3g} vs plain {med[k]['plain']:.3g}" for k in MEASURES)
            + f"; mean input shift per step: BN {shift['bn']:.3g} vs plain {shift['plain']:.3g}")
    if len(n["runs"]["bn"]["step"]) < 3:
        return "inconclusive", "too few measurement points: " + text
    if len(smoother) == len(MEASURES):
        return "reproduced", "BN's loss landscape is smoother on every measure: " + text
    return "not reproduced", f"BN smoother on {len(smoother)} of {len(MEASURES)} measures: " + text


def plot(n: Dict[str, Any], fig: Any) -> None:
    colours = {"plain": "tab:blue", "bn": "tab:red"}
    names = {"plain": "without BN", "bn": "with BN"}
    titles = {"loss_variation": "loss variation along the gradient", "grad_predictiveness": "gradient predictiveness",
              "beta_smoothness": "effective beta-smoothness"}
    for i, k in enumerate(MEASURES):
        ax = fig.add_subplot(1, 4, i + 1)
        for lab in ("plain", "bn"):
            r = n["runs"][lab]
            ax.plot(r["step"], r[k], color=colours[lab], label=names[lab])
        ax.set(xlabel="training step", title=titles[k], yscale="log")
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 4, 4)
    for lab in ("plain", "bn"):
        per_layer = list(zip(*n["runs"][lab]["input_shift"]))
        ax.plot(range(2, len(per_layer) + 2), [statistics.median(v) for v in per_layer], "o-", color=colours[lab],
                label=f"{names[lab]}: input shift")
        per_layer = list(zip(*n["runs"][lab]["ics"]))
        ax.plot(range(2, len(per_layer) + 2), [statistics.median(v) for v in per_layer], "s--", color=colours[lab],
                label=f"{names[lab]}: ICS (grad.)")
    ax.set(xlabel="linear layer", title="median per-step change (relative)", yscale="log")
    ax.set_xticks(range(2, len(per_layer) + 2))
    ax.legend(fontsize=7)


EXPERIMENT = Experiment(
    name="covariate_shift",
    title="Internal covariate shift vs loss smoothness (Santurkar et al. 2018)",
    finding="Let the numbers speak: per-layer input shift and gradient-based ICS with and without BN, and the "
            "loss-landscape measures of Santurkar et al., whose claim is that BN makes the loss smoother "
            "(smaller loss variation, more predictive gradients, smaller effective beta) rather than reducing ICS.",
    criterion="The smoothness claim is reproduced when the BN net's median loss variation, gradient "
              "predictiveness and effective beta-smoothness over training are all below the plain net's "
              "(same learning rate); the ICS numbers are reported without a criterion.",
    source="Santurkar, Tsipras, Ilyas & Madry 2018, figs. 4-5 (VGG on CIFAR-10); here a 4x100 MLP on digits",
    run=run, judge=judge, plot=plot, figsize=(16.0, 4.0),
)
