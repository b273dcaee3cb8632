"""The lab's training loop: plain mini-batch training with evaluation points and hooks.

Determinism: the model's initialization is seeded by the caller (:func:`seeded`), batch order by ``seed``
through a private ``torch.Generator``; with one torch thread (:func:`single_thread`) a run is bit-for-bit
reproducible on a given machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset, batch_indices

__all__ = ["seeded", "single_thread", "evaluate", "fit", "History", "steps_to"]

#: a loss above this (or non-finite) counts as divergence and stops the run
DIVERGED_LOSS = 1e4


def single_thread() -> None:
    """Tiny models run fastest with one intra-op thread (and sweeps then parallelize across processes)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def seeded(seed: int) -> None:
    """Seed torch's global generator (used by module initialization)."""
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 2048) -> Dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` in eval mode (its mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk])
        loss += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + chunk]).sum())
    model.train(was_training)
    n = max(len(y), 1)
    return {"acc": correct / n, "loss": loss / n if math.isfinite(loss) else float("inf")}


@dataclass
class History:
    """What :func:`fit` observed: evaluation points, the running training loss, and the final numbers."""

    steps: List[int] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    diverged: bool = False
    steps_done: int = 0
    final: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "test_acc": self.test_acc, "train_loss": self.train_loss,
                "diverged": self.diverged, "steps_done": self.steps_done, "final": self.final}


def fit(model: nn.Module, data: Dataset, *, steps: int, batch_size: int, lr: float, seed: int,
        optimizer: str = "sgd", momentum: float = 0.0, eval_every: Optional[int] = None,
        on_step: Optional[Callable[[int, nn.Module, float], None]] = None,
        on_eval: Optional[Callable[[int, nn.Module], None]] = None,
        loss_fn: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None,
        final_train_eval: int = 2000, param_groups: Optional[List[dict]] = None) -> History:
    """Train ``model`` for ``steps`` mini-batch steps of cross-entropy; return a :class:`History`.

    ``optimizer``: ``"sgd"`` (with optional ``momentum``) or ``"adam"``. Every ``eval_every`` steps (and at
    step 0 and the end) the test accuracy is recorded and ``on_eval(step, model)`` is called;
    ``on_step(step, model, loss)`` runs after every update. ``loss_fn(model, xb, yb)`` replaces the default
    ``cross_entropy(model(xb), yb)``; ``param_groups`` (optimizer parameter groups) replaces the model's
    parameters, e.g. to give some parameters their own learning rate. A non-finite loss or one above :data:`DIVERGED_LOSS` stops the run
    with ``diverged=True``. ``final`` holds test and train (first ``final_train_eval`` samples) accuracy/loss.
    """
    if steps < 0:
        raise ValueError(f"fit: steps must be >= 0, got {steps}")
    params: Any = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(f"fit: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    gen = torch.Generator().manual_seed(seed)
    batches = batch_indices(len(data.y_train), batch_size, gen)
    hist = History()
    model.train()
    running = None

    def record(step: int) -> None:
        hist.steps.append(step)
        hist.test_acc.append(evaluate(model, data.x_test, data.y_test)["acc"])
        hist.train_loss.append(float("nan") if running is None else running)
        if on_eval is not None:
            on_eval(step, model)

    if eval_every:
        record(0)
    for step in range(1, steps + 1):
        idx = next(batches)
        xb, yb = data.x_train[idx], data.y_train[idx]
        loss = loss_fn(model, xb, yb) if loss_fn is not None else F.cross_entropy(model(xb), yb)
        value = float(loss.detach())
        if not math.isfinite(value) or value > DIVERGED_LOSS:
            hist.diverged = True
            hist.steps_done = step - 1
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = value if running is None else 0.9 * running + 0.1 * value
        hist.steps_done = step
        if on_step is not None:
            on_step(step, model, value)
        if eval_every and step % eval_every == 0:
            record(step)
    if eval_every and (not hist.steps or hist.steps[-1] != hist.steps_done) and not hist.diverged:
        record(hist.steps_done)
    test = evaluate(model, data.x_test, data.y_test)
    train = evaluate(model, data.x_train[:final_train_eval], data.y_train[:final_train_eval])
    if hist.diverged:
        test = {"acc": 1.0 / data.num_classes, "loss": float("inf")}
        train = dict(test)
    hist.final = {"test_acc": test["acc"], "test_loss": test["loss"], "train_acc": train["acc"],
                  "train_loss": train["loss"]}
    return hist


def steps_to(history_steps: List[int], values: List[float], threshold: float) -> Optional[int]:
    """The first recorded step whose value reaches ``threshold`` (None if never)."""
    for s, v in zip(history_steps, values):
        if v >= threshold:
            return s
    return None
