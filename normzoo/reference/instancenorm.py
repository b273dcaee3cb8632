"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016): forward and hand-derived backward.

Each channel of each sample is normalized over its spatial positions. For ``x`` (N, C, H, W)::

    mu_nc   = mean_{h,w} x_nchw
    var_nc  = mean_{h,w} (x_nchw - mu_nc)^2          (biased)
    out     = gamma_c * (x - mu_nc) / sqrt(var_nc + eps) + beta_c

``in_param``: ``"eps"`` (default ``1e-5``). Statistics always come from the instance itself, as in
torch's default ``InstanceNorm2d(track_running_stats=False)``, so there is no train/test mode.
An instance with a single spatial position would normalize to all zeros; like torch in training,
that is refused.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Tuple

import numpy as np

from ._checks import (as_float_array, channel_affine, check_cache, check_dout, get_positive, param_dict,
                      require_instances)
from ._core import affine_backward, bn_axes, spatial_axes, standardize, standardize_backward

__all__ = ["InstanceNormCache", "instancenorm_forward", "instancenorm_backward"]


class InstanceNormCache(NamedTuple):
    """What :func:`instancenorm_forward` saves for the backward pass."""

    x_hat: np.ndarray
    inv_std: np.ndarray            # (N, C, 1, ..., 1)
    gamma: np.ndarray              # (1, C, 1, ..., 1)
    gamma_shape: Tuple[int, ...]   # shape gamma was given in


def instancenorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                         in_param: Mapping[str, Any]) -> Tuple[np.ndarray, InstanceNormCache]:
    """Instance norm of ``x`` (N, C, H, W), or any (N, C, *spatial) with more than one position.

    ``gamma``/``beta``: (C,) or (1, C, 1, 1). Returns ``(out, cache)``, ``out`` shaped like ``x``.
    """
    fn = "instancenorm_forward"
    in_param = param_dict(in_param, "in_param", fn)
    x = as_float_array(x, "x", fn)
    require_instances(x, fn)
    g, b = channel_affine(gamma, beta, x, fn)
    eps = get_positive(in_param, "eps", 1e-5, "in_param", fn)
    x_hat, _, _, inv_std = standardize(x, spatial_axes(x.ndim), eps)
    return g * x_hat + b, InstanceNormCache(x_hat, inv_std, g, np.shape(gamma))


def instancenorm_backward(dout: np.ndarray, cache: InstanceNormCache
                          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`instancenorm_forward`.

    With ``g = dout * gamma`` and means over the spatial positions of each (n, c)::

        dx     = (g - mean(g) - x_hat * mean(g * x_hat)) / sqrt(var_nc + eps)
        dgamma = sum_{n,h,w} dout * x_hat,     dbeta = sum_{n,h,w} dout

    Returns ``(dx, dgamma, dbeta)``, the last two in the shape gamma was given.
    """
    fn = "instancenorm_backward"
    check_cache(cache, InstanceNormCache, fn)
    dout = check_dout(dout, cache.x_hat.shape, fn)
    sp = spatial_axes(dout.ndim)
    dgamma, dbeta = affine_backward(dout, cache.x_hat, bn_axes(dout.ndim), cache.gamma_shape)
    dx = standardize_backward(dout * cache.gamma, cache.x_hat, cache.inv_std, sp)
    return dx, dgamma, dbeta
