"""Spectral Normalization (Miyato et al. 2018): how good is one power iteration per step?

A ReLU MLP (64 -> 256 -> 256 -> 10) on the digits with every linear layer spectrally normalized
(:func:`normzoo.nn.spectral_norm`, one power iteration per training-mode forward). To watch the estimate
converge, the stored vectors ``u``, ``v`` are reset to random unit vectors at step 0 (the layer itself
starts with 15 iterations). At every step, for each layer, the estimate used in the forward
(:func:`normzoo.nn.spectral_sigma`, ``u^T W v``) is compared with the exact largest singular value of
``W`` (``torch.linalg.matrix_norm(W, 2)``). As a baseline, a *fresh* estimate is computed at the same
step from a new random vector with one iteration (the vector not carried over).

Two runs: with the weights held still (learning rate 0: pure power iteration, one step per forward), and
during training with Adam at a GAN-like learning rate (2e-4), where the weights -- and their top singular
vectors -- move while the estimate follows them.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import data as lab_data
from ..models import MLP, nn_function
from ..runner import Context, Experiment
from ..train import fit, seeded

TOLERANCE = 0.02   # relative error counted as converged
WITHIN = 50        # ... within this many steps
LR = 2e-4          # Adam, as in GAN training


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def train_one(seed: int, steps: int, lr: float) -> Dict[str, Any]:
    d = lab_data.digits()
    seeded(seed)
    net = MLP(d.num_features, [256, 256], d.num_classes, activation="relu")
    spectral_norm, spectral_sigma = nn_function("spectral_norm"), nn_function("spectral_sigma")
    layers = net.linears()
    gen = torch.Generator().manual_seed(seed + 20_000)
    for lin in layers:
        spectral_norm(lin)
        sn = lin.parametrizations.weight[0]
        with torch.no_grad():
            sn._u.copy_(F.normalize(torch.randn(sn._u.shape, generator=gen), dim=0))
            sn._v.copy_(F.normalize(torch.randn(sn._v.shape, generator=gen), dim=0))
    carried: List[List[float]] = [[] for _ in layers]
    fresh: List[List[float]] = [[] for _ in layers]
    exact_sigma: List[List[float]] = [[] for _ in layers]

    def loss_fn(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = model(xb)  # runs this step's power iteration
        with torch.no_grad():
            for i, lin in enumerate(layers):
                w = lin.parametrizations.weight.original
                exact = float(torch.linalg.matrix_norm(w, 2))
                u0 = F.normalize(torch.randn(w.shape[0], generator=gen), dim=0)
                v1 = F.normalize(w.t() @ u0, dim=0)
                u1 = F.normalize(w @ v1, dim=0)
                carried[i].append(_rel(float(spectral_sigma(lin)), exact))
                fresh[i].append(_rel(float(u1 @ w @ v1), exact))
                exact_sigma[i].append(exact)
        return F.cross_entropy(out, yb)

    h = fit(net, d, steps=steps, batch_size=64, lr=lr, optimizer="adam", seed=seed, loss_fn=loss_fn)
    return {"carried": carried, "fresh": fresh, "exact": exact_sigma, "final": h.final}


def _converged_at(errors: List[float]) -> Optional[int]:
    """First step from which the relative error stays below the tolerance (None if never)."""
    last_bad = max((i for i, e in enumerate(errors) if e >= TOLERANCE), default=-1)
    return last_bad + 1 if last_bad + 1 < len(errors) else None


def run(ctx: Context) -> Dict[str, Any]:
    steps = ctx.steps(300, 2000, minimum=10)
    still_steps = min(steps, 2 * WITHIN + 50) if ctx.scale == 1 else steps
    still, moving = ctx.map(train_one, [dict(seed=ctx.seed, steps=still_steps, lr=0.0),
                                        dict(seed=ctx.seed, steps=steps, lr=LR)])
    names = [f"layer {i + 1} ({s})" for i, s in enumerate(("64->256", "256->256", "256->10"))]
    conv = [_converged_at(c) for c in still["carried"]]
    tail = max(1, steps // 2)
    med = {"carried": [statistics.median(c[-tail:]) for c in moving["carried"]],
           "fresh": [statistics.median(f[-tail:]) for f in moving["fresh"]]}
    summary: Dict[str, Any] = {f"weights held still, {nm}: steps until within {TOLERANCE:.0%} for good": c
                               for nm, c in zip(names, conv)}
    summary.update({f"training (Adam {LR:g}), {nm}: median relative error, second half, carried / fresh":
                    [round(c, 5), round(f, 5)] for nm, c, f in zip(names, med["carried"], med["fresh"])})
    summary["test accuracy of the spectrally normalized net"] = round(moving["final"]["test_acc"], 4)
    return {"steps": steps, "lr": LR, "layers": names, "still": {k: still[k] for k in ("carried", "fresh")},
            "carried": moving["carried"], "fresh": moving["fresh"], "exact": moving["exact"], "converged_at": conv,
            "median_error": med, "summary": summary}


def judge(n: Dict[str, Any]) -> Tuple[str, str]:
    conv, med = n["converged_at"], n["median_error"]
    text = (f"weights held still: the carried-over estimate is within {TOLERANCE:.0%} for good after "
            f"{', '.join(str(c) if c is not None else 'never' for c in conv)} steps (per layer); during training "
            f"the median relative error is {max(med['carried']):.2e} carried over vs {min(med['fresh']):.2e} for a "
            "fresh one-iteration estimate (worst/best layer)")
    if len(n["still"]["carried"][0]) < 2 * WITHIN:
        return "inconclusive", "too few steps to judge: " + text
    if all(c is not None and c <= WITHIN for c in conv) and max(med["carried"]) < min(med["fresh"]):
        return "reproduced", text
    return "not reproduced", text


def plot(n: Dict[str, Any], fig: Any) -> None:
    for k, (key, title) in enumerate((("still", "weights held still"), ("moving", f"during training (Adam {n['lr']:g})"))):
        ax = fig.add_subplot(1, 3, k + 1)
        src = n["still"] if key == "still" else n
        for i, nm in enumerate(n["layers"]):
            steps = range(1, len(src["carried"][i]) + 1)
            line, = ax.semilogy(steps, [max(e, 1e-8) for e in src["carried"][i]], label=f"{nm}, carried over")
            ax.semilogy(steps, [max(e, 1e-8) for e in src["fresh"][i]], color=line.get_color(), alpha=0.3, lw=0.8,
                        label=f"{nm}, fresh vector")
        ax.axhline(TOLERANCE, color="grey", ls=":", lw=1)
        ax.axvline(WITHIN, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="step (one power iteration each)", ylabel="|sigma_est - sigma| / sigma", title=title)
        if k == 0:
            ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 3, 3)
    for i, nm in enumerate(n["layers"]):
        ax.plot(range(1, len(n["exact"][i]) + 1), n["exact"][i], label=nm)
    ax.set(xlabel="training step", ylabel="exact sigma(W), unnormalized weight", title="sigma during training")
    ax.legend(fontsize=8)


EXPERIMENT = Experiment(
    name="spectral_norm",
    title="Spectral Norm: one power iteration per step suffices when the vector is carried over",
    finding="Carrying the power-iteration vector from step to step, one iteration per training step tracks the "
            "largest singular value closely: from a random start the estimate converges within tens of steps.",
    criterion=f"From random u, v, with the weights held still every layer's estimate is within {TOLERANCE:.0%} of "
              f"the exact sigma from step {WITHIN} on; during training its median error (second half) is below "
              "that of a fresh one-iteration estimate in every layer.",
    source="Miyato et al. 2018, sec. 2.1 and appendix A",
    run=run, judge=judge, plot=plot, requires=("spectral_norm", "spectral_sigma"), figsize=(15.0, 4.2),
)
