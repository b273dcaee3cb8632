"""Recalibrate population statistics (precise BN): recompute BatchNorm's running statistics over data.

Running statistics are exponential averages over the last few hundred training steps, taken while the
weights were still moving; after weight averaging (SWA), pruning, quantization or a change of data they are
stale. Recalibrating recomputes them with the final weights over a data loader.

Two estimators of the population statistics (they differ, and the design notes let the user choose):

- ``"pooled"`` (fvcore's precise BN): the mean and unbiased variance of *all* values seen, from the
  per-batch moments merged exactly with Chan's formula (:class:`normzoo.stats.Moments`) -- one pass, no
  storage. This is the variance the layer's input actually has over the data.
- ``"average"``: the mean of the per-batch means and of the per-batch *unbiased* variances, every batch
  weighing the same (torch's cumulative average, ``momentum=None``; the seeds' "store every batch's
  statistics"). It omits the spread of the batch means, so it is smaller than the pooled variance by
  about ``Var[batch mean]``; it is what a layer would have accumulated with ``momentum=None``.

The forward passes run with every module in eval mode except the recalibrated layers, which are in
training mode so that they normalize with batch statistics as during training (the distribution their
successors were trained on). Traps avoided: ``torch.optim.swa_utils.update_bn`` calls ``model.train()``,
which also turns on dropout (and anything else with a training mode) and so measures statistics of
a different network; hand-written loops forget to restore the modes or the momentum, or leave them broken
after an exception. Here the statistics are taken from the layers' inputs by forward pre-hooks, the
layers' own running-average updates are disabled (momentum 0, buffers restored), and every module's mode,
every layer's momentum and buffers are restored afterwards, on error too (then the statistics are left
as they were).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, TextIO, Tuple, Union

import torch
from torch import Tensor, nn

from normzoo.stats import Moments, moments
from normzoo.tools import _layers
from normzoo.tools.freeze import is_frozen

ESTIMATORS = ("pooled", "average")


class _Progress:
    """A one-line progress report on stderr: redrawn in place on a terminal, every ~10% otherwise."""

    def __init__(self, total: Optional[int], enabled: bool, stream: Optional[TextIO] = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count = 0

    def _line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        return f"recalibrate: {self.count}{of} batches"

    def update(self) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()
        elif self.total and self.count % max(1, self.total // 10) == 0 and self.count != self.total:
            self.stream.write(self._line() + "\n")

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self._line() + " done\n")
            self.stream.flush()


class _Accumulator:
    """Per-layer statistics of the inputs seen by a forward pre-hook."""

    def __init__(self, name: str, estimator: str) -> None:
        self.name, self.estimator = name, estimator
        self.batches = 0
        self.pooled: Optional[Moments] = None
        self.sum_mean: Optional[Tensor] = None
        self.sum_var: Optional[Tensor] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
            return
        m = moments(x.detach(), [0] + list(range(2, x.dim())))
        m = Moments(m.count, m.mean.double(), m.m2.double())
        self.batches += 1
        if self.estimator == "pooled":
            self.pooled = m if self.pooled is None else self.pooled.merge(m)
            return
        if m.count < 2:
            raise ValueError(f"recalibrate: the 'average' estimator needs more than 1 value per channel in each "
                             f"batch, got an input of shape {tuple(x.shape)} at {self.name!r}")
        var = m.var(1)
        self.sum_mean = m.mean if self.sum_mean is None else self.sum_mean + m.mean
        self.sum_var = var if self.sum_var is None else self.sum_var + var

    def result(self) -> Tuple[Tensor, Tensor]:
        """``(mean, unbiased variance)`` of the estimator (float64)."""
        if self.estimator == "pooled":
            assert self.pooled is not None
            n = self.pooled.count
            var = self.pooled.var(1) if n > 1 else torch.zeros_like(self.pooled.m2)
            return self.pooled.mean, var
        assert self.sum_mean is not None and self.sum_var is not None
        return self.sum_mean / self.batches, self.sum_var / self.batches


def _model_input(batch: Any, input_fn: Optional[Callable[[Any], Any]]) -> Any:
    if input_fn is not None:
        return input_fn(batch)
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, dict):
        raise TypeError(f"recalibrate: the loader yields dicts (keys {sorted(map(str, batch))}); pass "
                        "input_fn=lambda batch: batch['<key>'] to say which entry is the model's input")
    raise TypeError(f"recalibrate: cannot take the model input from a loader item of type {type(batch).__name__}; "
                    "expected a Tensor, a non-empty tuple/list (the first element is used) or pass input_fn")


def _to_device(obj: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*(_to_device(o, device) for o in obj))
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def recalibrate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    estimator: str = "pooled",
    num_batches: Optional[int] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    include_frozen: bool = False,
) -> nn.Module:
    """Recompute the running statistics of the BatchNorm-family layers of ``model`` over ``loader``.

    ``estimator``: ``"pooled"`` (default) or ``"average"`` (see the module docstring). Each layer's
    ``running_mean``/``running_var`` (those it has) become the estimate, with the unbiased variance, and
    ``num_batches_tracked`` the number of batches it saw. ``loader`` yields tensors, tuples/lists (the first
    element is the input) or anything ``input_fn(item)`` turns into the model's single argument; tensors are
    moved to ``device`` (default: where the model's parameters are). ``num_batches`` limits the batches
    used. A progress line goes to stderr unless ``progress=False``.

    Layers without running statistics are skipped, and so are layers frozen with
    :func:`normzoo.tools.freeze` (they stay in eval during the passes, as in the training they are frozen
    for) unless ``include_frozen=True``. Returns ``model``, in the train/eval state it had.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate: expected an nn.Module, got {type(model).__name__}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"recalibrate: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches <= 0):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}")
    layers: List[Tuple[str, nn.Module]] = [
        (name, m) for name, m in model.named_modules()
        if _layers.keeps_batch_stats(m) and any(k in _layers.running_stats(m) for k in ("running_mean", "running_var"))
        and (include_frozen or not is_frozen(m))
    ]
    if not layers:
        warnings.warn("recalibrate: the model has no BatchNorm-family layer with running statistics to recalibrate",
                      stacklevel=2)
        return model
    if device is None:
        ref = _layers.reference_tensor(model)
        device = ref.device if ref is not None else None
    device = torch.device(device) if device is not None else None

    modes = [(m, m.training) for m in model.modules()]
    momenta: Dict[int, Any] = {id(m): m.momentum for _, m in layers if hasattr(m, "momentum")}
    saved = {id(m): {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for _, m in layers}
    accs = [_Accumulator(name, estimator) for name, _ in layers]
    hooks = [m.register_forward_pre_hook(acc) for (_, m), acc in zip(layers, accs)]
    total = num_batches
    if hasattr(loader, "__len__"):
        total = len(loader) if total is None else min(total, len(loader))  # type: ignore[arg-type]
    bar = _Progress(total, progress)
    ok = False
    try:
        for m, _ in modes:
            m.training = False
        for _, m in layers:
            m.training = True  # batch statistics, as in training; nothing else (dropout!) changes mode
            if id(m) in momenta:
                m.momentum = 0.0  # the layer's own running average must not move
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if num_batches is not None and i >= num_batches:
                    break
                model(_to_device(_model_input(batch, input_fn), device))
                bar.update()
        ok = True
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
        for _, m in layers:
            if id(m) in momenta:
                m.momentum = momenta[id(m)]
            with torch.no_grad():
                for k, b in m.named_buffers(recurse=False):
                    if k in saved[id(m)]:
                        b.copy_(saved[id(m)][k])
        if ok:
            bar.close()
    unused = []
    with torch.no_grad():
        for (name, m), acc in zip(layers, accs):
            if acc.batches == 0:
                unused.append(_layers.describe(name, m))
                continue
            mean, var = acc.result()
            stats = _layers.running_stats(m)
            if "running_mean" in stats:
                stats["running_mean"].copy_(mean)
            if "running_var" in stats:
                stats["running_var"].copy_(var)
            if "num_batches_tracked" in stats:
                stats["num_batches_tracked"].fill_(acc.batches)
    if unused:
        warnings.warn(f"recalibrate: these layers saw no data and keep their statistics: {', '.join(unused)}",
                      stacklevel=2)
    return model


__all__ = ["recalibrate", "ESTIMATORS"]
