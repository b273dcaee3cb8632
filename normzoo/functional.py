"""Functional forms of the normalization layers, drop-in with ``torch.nn.functional``.

Every function is "statistics, then an affine map" on the statistics core (:mod:`normzoo.stats`) and
the channel-norm engine (:mod:`normzoo.channel_norm`). Signatures follow ``torch.nn.functional``.

Running statistics follow torch's convention, ``running = (1 - momentum) * running + momentum * batch``
with the unbiased batch variance (:mod:`normzoo.running`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from normzoo import _checks, row_norm
from normzoo.channel_norm import Policy, batch_stats_norm, channel_norm, fixed_affine, sample_norm
from normzoo.running import Running, update_running_stats

_Shape = Union[int, Sequence[int], torch.Size]


def _batch_norm_impl(name: str, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                     eps: float, mode: str) -> Tensor:
    _checks.check_input(name, input, (2, 3, 4, 5), shape_hint="(N, C, *spatial)")
    return batch_norm_checked_input(name, input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    mode)


def batch_norm_checked_input(name: str, input: Tensor, running_mean: Optional[Tensor],
                             running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                             training: bool, momentum: float, eps: float, mode: str) -> Tensor:
    """:func:`batch_norm` (``mode="standard"``) or :func:`mean_only_batch_norm` (``"mean"``) of an input whose
    rank and dtype the caller has checked (a module, which checks them before it counts the batch); the rest of
    the arguments are checked here, with ``name`` in the errors."""
    _checks.check_eps(name, eps)
    c = input.shape[1]
    _checks.check_channel_params(name, c, weight=weight, bias=bias, running_mean=running_mean,
                                 running_var=running_var)
    use_batch = training or running_mean is None or (mode != "mean" and running_var is None)
    if not use_batch:
        return fixed_affine(input, running_mean, running_var, weight, bias, eps, mean_only=mode == "mean")
    count = input.numel() // c if input.numel() else 0
    if mode != "mean" or count == 0:  # mean-only BN is defined for a single value per channel
        _checks.check_batch_stats(name, input, count)
    track = training and (running_mean is not None or running_var is not None)
    return batch_stats_norm(input, weight, bias, eps, mode, Running(running_mean, running_var, momentum) if track
                            else None)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch Normalization (Ioffe & Szegedy 2015), as ``torch.nn.functional.batch_norm``.

    ``input``: ``(N, C)`` or ``(N, C, *S)``. Training (or no running statistics): per channel over N and S,
    ``y = gamma (x - mu_B) / sqrt(var_B + eps) + beta`` with the biased batch variance, and the running
    statistics (if given) updated in place with the unbiased one. Eval: the running statistics.
    """
    return _batch_norm_impl("batch_norm", input, running_mean, running_var, weight, bias, training, momentum, eps,
                            "standard")


def mean_only_batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor] = None,
                         weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                         momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Mean-only Batch Normalization (Salimans & Kingma 2016, section 4), the partner of weight normalization.

    ``y = gamma (x - mu_B) + beta``: the batch mean is subtracted, nothing is divided. The paper's form has
    no ``gamma`` (weight normalization's ``g`` provides the scale); pass ``weight=None`` for it. The
    running variance, if given, is tracked for information (and torch-checkpoint compatibility) only.
    ``eps`` is unused by the normalization and kept for signature compatibility.
    """
    return _batch_norm_impl("mean_only_batch_norm", input, running_mean, running_var, weight, bias, training,
                            momentum, eps, "mean")


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Instance Normalization (Ulyanov et al. 2016), as ``torch.nn.functional.instance_norm``.

    ``input``: ``(N, C, *S)`` (also ``(C, *S)`` unbatched is accepted by the modules). Statistics per
    (sample, channel) over S. Running statistics, if given, are updated with the batch average of the
    per-instance mean and unbiased variance (torch's rule).
    """
    _checks.check_input("instance_norm", input, (3, 4, 5), shape_hint="(N, C, *spatial)")
    return instance_norm_checked_input("instance_norm", input, running_mean, running_var, weight, bias,
                                       use_input_stats, momentum, eps)


def instance_norm_checked_input(name: str, input: Tensor, running_mean: Optional[Tensor],
                                running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                                use_input_stats: bool, momentum: float, eps: float) -> Tensor:
    """:func:`instance_norm` of an input whose rank and dtype the caller (a module) has checked; the rest of the
    arguments are checked here, with ``name`` in the errors."""
    _checks.check_eps(name, eps)
    c = input.shape[1]
    _checks.check_channel_params(name, c, weight=weight, bias=bias, running_mean=running_mean,
                                 running_var=running_var)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(f"{name}: use_input_stats=False needs running_mean and running_var")
        return fixed_affine(input, running_mean, running_var, weight, bias, eps)
    spatial = input.numel() // (input.shape[0] * c) if input.numel() else 0
    _checks.check_batch_stats(name, input, spatial, "spatial element per channel")
    if running_mean is None and running_var is None:
        return sample_norm(input, weight, bias, c, eps)
    running = Running(running_mean, running_var, momentum)
    return channel_norm(input, weight, bias, Policy("instance"), eps, running=running, moments=False)[0]


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Group Normalization (Wu & He 2018), as ``torch.nn.functional.group_norm``.

    ``input``: ``(N, C, *S)``; statistics per sample over each group of ``C / num_groups`` consecutive
    channels and S; ``weight``/``bias`` per channel.
    """
    return checked_group_norm("group_norm", input, num_groups, weight, bias, eps)


def layer_norm_2d(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-5) -> Tensor:
    """Channel-first Layer Normalization for ``(N, C, *S)``: statistics per sample over C and S (as the LN
    paper defines it for convolutions), ``weight``/``bias`` per channel. Equal to ``group_norm`` with one group.

    Not to be confused with the per-position LayerNorm over C alone used by ConvNeXt-style models.
    """
    return checked_group_norm("layer_norm_2d", input, 1, weight, bias, eps, dims=(3, 4, 5))


def checked_group_norm(name: str, input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float, num_channels: Optional[int] = None, dims: Sequence[int] = (2, 3, 4, 5)) -> Tensor:
    """:func:`group_norm` with the caller's name in its errors, the input ranks it takes (``dims``), and the
    channel count a module was built for (``num_channels``), checked once on the way to the kernels."""
    _checks.check_input(name, input, dims, num_channels, "(N, C, *spatial)")
    _checks.check_eps(name, eps)
    c = input.shape[1]
    _checks.check_groups(name, num_groups, c)
    _checks.check_param(name, "weight", weight, (c,))
    _checks.check_param(name, "bias", bias, (c,))
    return sample_norm(input, weight, bias, num_groups, eps)


def _as_shape(normalized_shape: _Shape) -> Tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def last_dims_norm(name: str, input: Tensor, shape: Tuple[int, ...], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, mode: str) -> Tensor:
    """Normalize over the trailing ``shape`` dims (a tuple of ints: :func:`layer_norm`'s ``normalized_shape`` as
    given, or a module's own, checked when it was built): rows ``(R, D)`` with a per-element affine; ``mode``
    ``"standard"`` (LayerNorm) or ``"rms"`` (RMSNorm). The rest of the arguments are checked here."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(input).__name__}")
    _checks.check_floating(name, input)
    _checks.check_eps(name, eps)
    k = len(shape)
    if k == 0 or input.dim() < k or input.shape[input.dim() - k:] != shape:
        raise ValueError(
            f"{name}: expected input whose last {k} dim(s) are normalized_shape={tuple(shape)}, "
            f"got input of shape {tuple(input.shape)}"
        )
    _checks.check_param(name, "weight", weight, shape)
    _checks.check_param(name, "bias", bias, shape)
    d = math.prod(shape)
    if row_norm.applies(input, d):  # one op on the input as it is: no reshape nodes in the graph
        return row_norm.row_norm(input, weight, bias, d, eps, mode == "rms")
    rows = input.reshape(-1, d)
    w = weight.reshape(d) if weight is not None else None
    b = bias.reshape(d) if bias is not None else None
    y, _ = channel_norm(rows, w, b, Policy("group", 1), eps, mode=mode)
    return y.view(input.shape)


def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Layer Normalization (Ba et al. 2016), as ``torch.nn.functional.layer_norm``: statistics over the last
    ``len(normalized_shape)`` dims, element-wise ``weight``/``bias`` of shape ``normalized_shape``.

    Unlike torch's kernel, which computes ``E[x^2] - E[x]^2``-style moments and loses the variance of data
    with a large mean (mean 1e4, std 1e-3 in float32), the statistics here are guarded (see :mod:`normzoo.stats`).
    """
    return last_dims_norm("layer_norm", input, _as_shape(normalized_shape), weight, bias, eps, "standard")


def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Root Mean Square Layer Normalization (Zhang & Sennrich 2019), as ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dims. ``eps=None`` means what torch's kernels use:
    the machine epsilon of the type the statistics are computed in, ``torch.finfo(input.dtype).eps`` for
    float32 and float64 and float32's for bfloat16 and float16 (torch's documentation names the input's dtype
    for all; with bfloat16's, 2^-7, rows whose mean square is small would come out far from torch's).
    """
    return last_dims_norm("rms_norm", input, _as_shape(normalized_shape), weight, None, rms_eps(input, eps), "rms")


def rms_eps(input: Tensor, eps: Optional[float]) -> float:
    """:func:`rms_norm`'s ``eps``: as given, or for ``None`` the machine epsilon of the type its statistics are
    computed in (float32's for bfloat16 and float16 input)."""
    if eps is not None:
        return eps
    return (torch.finfo(torch.promote_types(input.dtype, torch.float32)).eps
            if isinstance(input, Tensor) and input.is_floating_point() else 1e-6)


# Functional forms of the methods whose modules live in their own files, re-exported lazily: their
# modules import normzoo.nn, which imports this module.
_ELSEWHERE = {
    "filter_response_norm": "normzoo.nn.response",
    "tlu": "normzoo.nn.response",
    "evonorm_b0": "normzoo.nn.evonorm",
    "evonorm_s0": "normzoo.nn.evonorm",
    "batch_renorm": "normzoo.nn.renorm",
    "batch_instance_norm": "normzoo.nn.batch_instance",
    "switchable_norm": "normzoo.nn.switchable",
    "sync_batch_norm": "normzoo.nn.sync",
}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module 'normzoo.functional' has no attribute {name!r}")


__all__ = [
    "batch_norm",
    "mean_only_batch_norm",
    "instance_norm",
    "group_norm",
    "layer_norm",
    "layer_norm_2d",
    "rms_norm",
    "update_running_stats",
    *_ELSEWHERE,
]
