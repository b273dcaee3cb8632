"""Per-sample normalizations: InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, LayerNorm2d, RMSNorm.

Drop-in with their ``torch.nn`` namesakes (signatures, defaults, parameters, buffers, state_dict keys).
Differences, all deliberate: ``InstanceNorm`` with ``track_running_stats=True`` and ``momentum=None``
keeps the cumulative average of all batches (torch silently never updates it); a channel count that
does not match ``num_features`` is an error (torch only warns when ``affine=False``); statistics are
guarded against cancellation (torch's LayerNorm loses the variance of data with mean 1e4, std 1e-3).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from normzoo import _checks
from normzoo import functional as F
from normzoo.nn._base import NormBase, affine_of, init_affine, reset_affine
from normzoo.registry import register

_Shape = Union[int, Sequence[int], torch.Size]


class _InstanceNorm(NormBase):
    """Instance Normalization (Ulyanov et al. 2016): statistics per sample and channel over the spatial dims.

    ``y = gamma (x - mu_nc) / sqrt(var_nc + eps) + beta``. Defaults as torch: ``affine=False``,
    ``track_running_stats=False``. With tracking, training updates the running statistics with the batch
    average of the instance mean and unbiased variance, and eval uses them. Accepts unbatched input
    (one dim less) as torch does. Unlike torch, ``num_batches_tracked`` counts the training batches
    (torch leaves it at 0), which is what makes ``momentum=None`` a cumulative average here.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device: Any = None, dtype: Any = None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, Tensor) and input.dim() == self._input_dims[0] - 1:  # unbatched
            return self.forward(input.unsqueeze(0)).squeeze(0)
        x = self._check_input(input)  # before the batch is counted
        weight, bias, running_mean, running_var, counter = self._state()
        factor = self._momentum_factor(counter)
        track = self.track_running_stats
        return F.instance_norm_checked_input(type(self).__name__, x, running_mean if track else None,
                                             running_var if track else None, weight, bias,
                                             self.training or not track, factor, self.eps)


@register("in1d", "instancenorm1d")
def _make_in1d(num_features: int, affine: bool = True, **kw: Any) -> "InstanceNorm1d":
    return InstanceNorm1d(num_features, affine=affine, **kw)


@register("in2d", "instancenorm2d", "in")
def _make_in2d(num_features: int, affine: bool = True, **kw: Any) -> "InstanceNorm2d":
    return InstanceNorm2d(num_features, affine=affine, **kw)


@register("in3d", "instancenorm3d")
def _make_in3d(num_features: int, affine: bool = True, **kw: Any) -> "InstanceNorm3d":
    return InstanceNorm3d(num_features, affine=affine, **kw)


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _input_dims = (3,)
    _shape_hint = "(N, C, L)"


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


class _ChannelAffine(nn.Module):
    """Per-channel ``weight``/``bias`` for the per-sample channel-first layers (no running statistics)."""

    def reset_parameters(self) -> None:
        reset_affine(self)


class GroupNorm(_ChannelAffine):
    """Group Normalization (Wu & He 2018), ``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)``.

    Statistics per sample over each of ``num_groups`` groups of consecutive channels and the spatial dims;
    ``weight``/``bias`` per channel. ``num_groups=1`` is the channel-first LayerNorm, ``num_groups=C``
    InstanceNorm with affine. Input ``(N, C, *S)``. (``normzoo.create("gn", C, groups=G)`` takes the
    channel count first.)
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None, *, bias: bool = True) -> None:
        _checks.check_positive_int("GroupNorm", "num_channels", num_channels)
        _checks.check_groups("GroupNorm", num_groups, num_channels)
        _checks.check_eps("GroupNorm", eps)
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        init_affine(self, num_channels, affine, affine and bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.checked_group_norm("GroupNorm", input, self.num_groups, *affine_of(self), self.eps,
                                    self.num_channels)

    def extra_repr(self) -> str:
        return "{num_groups}, {num_channels}, eps={eps}, affine={affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)


def default_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``max_groups`` (32, the GroupNorm paper's default)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


@register("gn", "groupnorm")
def _make_gn(num_channels: int, groups: Optional[int] = None, **kw: Any) -> GroupNorm:
    return GroupNorm(default_groups(num_channels) if groups is None else groups, num_channels, **kw)


@register("ln2d", "layernorm2d")
class LayerNorm2d(_ChannelAffine):
    """Channel-first Layer Normalization for ``(N, C, *S)``: statistics per sample over C and S, per-channel
    ``weight``/``bias``. This is the LN paper's definition applied to feature maps, equal to
    ``GroupNorm(1, C)`` and to ``torch.nn.LayerNorm([C, H, W])`` except that the affine is per channel
    (so it does not tie the layer to one spatial size). ConvNeXt-style per-position LayerNorm over C alone
    is a different layer.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device: Any = None,
                 dtype: Any = None, *, bias: bool = True) -> None:
        _checks.check_positive_int("LayerNorm2d", "num_channels", num_channels)
        _checks.check_eps("LayerNorm2d", eps)
        super().__init__()
        self.num_channels, self.eps, self.affine = num_channels, eps, affine
        init_affine(self, num_channels, affine, affine and bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.checked_group_norm("LayerNorm2d", input, 1, *affine_of(self), self.eps, self.num_channels,
                                    dims=(3, 4, 5))

    def extra_repr(self) -> str:
        return "{num_channels}, eps={eps}, affine={affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)


def _normalized_shape(layer: str, normalized_shape: _Shape) -> Tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in shape):
        raise ValueError(f"{layer}: normalized_shape must be a positive int or a non-empty tuple of them, "
                         f"got {normalized_shape!r}")
    return shape


@register("ln", "layernorm")
class LayerNorm(nn.Module):
    """Layer Normalization (Ba et al. 2016) over the last dims, ``torch.nn.LayerNorm``'s signature.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` over the trailing ``normalized_shape`` dims,
    element-wise ``weight``/``bias`` of that shape (``elementwise_affine``, ``bias``). Input ``(*, *normalized_shape)``.
    """

    def __init__(self, normalized_shape: _Shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        self.normalized_shape = _normalized_shape("LayerNorm", normalized_shape)
        _checks.check_eps("LayerNorm", eps)
        super().__init__()
        self.eps, self.elementwise_affine = eps, elementwise_affine
        init_affine(self, self.normalized_shape, elementwise_affine, elementwise_affine and bias, device, dtype)

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        return F.last_dims_norm("LayerNorm", input, self.normalized_shape, *affine_of(self), self.eps, "standard")

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, bias={use_bias}".format(
            **self.__dict__, use_bias=self.bias is not None)


@register("rms", "rmsnorm")
class RMSNorm(nn.Module):
    """Root Mean Square Layer Normalization (Zhang & Sennrich 2019), ``torch.nn.RMSNorm``'s signature.

    ``y = x / sqrt(mean(x^2) + eps) * weight`` over the trailing ``normalized_shape`` dims; no centring and
    no bias. ``eps=None`` uses torch's default: ``torch.finfo(x.dtype).eps``, float32's for bfloat16 and float16
    input (see :func:`normzoo.functional.rms_norm`).
    """

    def __init__(self, normalized_shape: _Shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        self.normalized_shape = _normalized_shape("RMSNorm", normalized_shape)
        if eps is not None:
            _checks.check_eps("RMSNorm", eps)
        super().__init__()
        self.eps, self.elementwise_affine = eps, elementwise_affine
        init_affine(self, self.normalized_shape, elementwise_affine, False, device, dtype)

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        return F.last_dims_norm("RMSNorm", input, self.normalized_shape, affine_of(self)[0], None,
                                F.rms_eps(input, self.eps), "rms")

    def extra_repr(self) -> str:
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}".format(**self.__dict__)


__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "GroupNorm", "LayerNorm2d", "LayerNorm", "RMSNorm",
           "default_groups"]
