"""The BatchNorm family: BatchNorm1d/2d/3d and mean-only BatchNorm1d/2d/3d.

Drop-in with ``torch.nn.BatchNorm*``: same signatures, defaults, parameters, buffers and state_dict keys,
the same train/eval behaviour, and channels_last kept. A ``torch.nn.BatchNorm2d`` checkpoint loads into
``normzoo.nn.BatchNorm2d`` (and into every BN-family variant) and back.
"""
from __future__ import annotations

from torch import Tensor

from normzoo import functional as F
from normzoo.nn._base import NormBase
from normzoo.registry import register


class _BatchNorm(NormBase):
    """Batch Normalization (Ioffe & Szegedy 2015) over the batch and spatial dims, per channel.

    Training: ``y = gamma (x - mu_B) / sqrt(var_B + eps) + beta`` with the biased batch variance ``var_B``;
    the running statistics are updated with ``running = (1 - momentum) running + momentum batch`` using the
    unbiased variance ``M2 / (m - 1)`` (``m`` = elements per channel); ``momentum=None`` gives the
    cumulative average of all batches. Eval (with ``track_running_stats``): the running statistics.
    Without ``track_running_stats`` the batch statistics are used in eval too (as torch).

    Shapes: ``(N, C)`` or ``(N, C, L)`` (1d), ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d); output the same
    shape, dtype and memory format.
    """

    _mode = "standard"  #: what the channel statistics divide out: "standard", or "mean" (mean-only BatchNorm)

    def forward(self, input: Tensor) -> Tensor:
        x = self._check_input(input)  # before the batch is counted
        weight, bias, running_mean, running_var, counter = self._state()
        factor = self._momentum_factor(counter)
        track = not self.training or self.track_running_stats
        return F.batch_norm_checked_input(
            type(self).__name__,
            x,
            running_mean if track else None,
            running_var if track else None,
            weight,
            bias,
            self.training or (running_mean is None and running_var is None),
            factor,
            self.eps,
            self._mode,
        )


@register("bn1d", "batchnorm1d")
class BatchNorm1d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__
    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


@register("bn2d", "batchnorm2d", "bn")
class BatchNorm2d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


@register("bn3d", "batchnorm3d")
class BatchNorm3d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


class _MeanOnlyBatchNorm(_BatchNorm):
    """Mean-only Batch Normalization (Salimans & Kingma 2016, section 4): ``y = gamma (x - mu_B) + beta``.

    Recommended with weight normalization (:func:`normzoo.nn.weight_norm`), which supplies the scale: the
    batch mean is subtracted, the batch variance is not divided out, so the noise added by batch statistics
    is gentler than BatchNorm's. The paper's layer has a bias only; ``affine=True`` also keeps a ``weight``
    initialised to 1 so that BatchNorm checkpoints load unchanged (pass ``affine=False`` and add a bias
    elsewhere for the paper's exact form). Eval uses ``running_mean``; ``running_var`` is tracked for
    information and checkpoint compatibility but not used.
    """

    _mode = "mean"


@register("mbn1d", "meanonly_bn1d")
class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    __doc__ = _MeanOnlyBatchNorm.__doc__
    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


@register("mbn2d", "meanonly_bn2d", "mbn")
class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    __doc__ = _MeanOnlyBatchNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


@register("mbn3d", "meanonly_bn3d")
class MeanOnlyBatchNorm3d(_MeanOnlyBatchNorm):
    __doc__ = _MeanOnlyBatchNorm.__doc__
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d",
           "MeanOnlyBatchNorm3d"]
