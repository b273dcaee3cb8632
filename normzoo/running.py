"""Running statistics: the exponential moving averages that BatchNorm-style layers use in eval mode.

torch's convention, used by every layer here: ``running = (1 - momentum) * running + momentum * batch``
(``running.lerp_(batch, momentum)``), where the batch variance is the **unbiased** one, ``M2 / (m - 1)``
with ``m`` the number of elements per channel (the ``m/(m-1)`` correction of the seeds and the BN paper).
A batch of one element per channel (allowed by mean-only BatchNorm) contributes a variance of 0. The
NumPy reference uses CS231n's opposite convention (``momentum=0.9`` keeps 90% of the old value); see
:mod:`normzoo.reference`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from normzoo.stats import Moments


def count_batch_(counter: Tensor) -> int:
    """``counter += 1`` in place (a layer's ``num_batches_tracked``); returns the new count.

    A plain CPU int64 counter of one element is bumped through its memory: a dispatched ``add_`` costs a
    small layer about 10 us of its step (torch's own BatchNorm pays it too). Anything else (another device
    or dtype, a tensor subclass, an inference tensor outside inference mode) takes ``add_``, with its
    checks. The value is the same either way; only the tensor's autograd version counter is left alone
    (a counter is never saved for backward).
    """
    if (type(counter) is Tensor and counter.is_cpu and counter.dtype == torch.int64 and counter.numel() == 1
            and not counter.is_inference()):
        cell = ctypes.c_int64.from_address(counter.data_ptr())
        cell.value += 1
        return int(cell.value)
    counter.add_(1)
    return int(counter)


@dataclass
class Running:
    """The running-statistics buffers a forward pass should update (either may be ``None``) and the factor."""

    mean: Optional[Tensor]
    var: Optional[Tensor]
    momentum: float

    def update(self, batch: Moments) -> None:
        """:func:`update_running_stats` of these buffers with ``batch``."""
        update_running_stats(self.mean, self.var, batch, self.momentum)


def update_running_stats(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], batch: Moments, momentum: float
) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch`` (unbiased batch variance).

    ``batch`` holds one group per channel (shape ``(C,)``, or ``(1, C)``). Instance statistics of shape
    ``(N, C)`` are averaged over the batch first, as torch does for InstanceNorm.
    """
    with torch.no_grad():
        mean = batch.mean
        var = batch.var(1) if batch.count > 1 else torch.zeros_like(batch.m2)
        if mean.dim() == 2:
            mean, var = mean.mean(0), var.mean(0)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_(var.to(running_var.dtype), momentum)


__all__ = ["Running", "update_running_stats"]
