"""Group Normalization (Wu & He, 2018): forward and hand-derived backward, CS231n signatures.

The ``C`` channels of each sample are split into ``G`` groups of ``C/G`` consecutive channels; each
group is normalized over its channels and spatial positions, then a per-channel affine map follows.
For ``x`` (N, C, H, W) viewed as (N, G, C/G, H, W)::

    mu_ng   = mean over (C/G, H, W) of group g of sample n
    var_ng  = matching biased variance
    out     = gamma_c * (x - mu_ng) / sqrt(var_ng + eps) + beta_c

``G = 1`` is layer norm over (C, H, W) with per-channel affine; ``G = C`` is instance norm.
``gn_param``: ``"eps"`` (default ``1e-5``). No running statistics, no train/test difference.
``gamma``/``beta`` may be (C,) (torch) or (1, C, 1, 1) (the CS231n assignment).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Tuple

import numpy as np

from ._checks import (as_float_array, channel_affine, check_cache, check_dout, get_positive, param_dict,
                      require_ndim)
from ._core import affine_backward, bn_axes, standardize, standardize_backward

__all__ = ["GroupNormCache", "spatial_groupnorm_forward", "spatial_groupnorm_backward"]


class GroupNormCache(NamedTuple):
    """What :func:`spatial_groupnorm_forward` saves for the backward pass."""

    x_hat: np.ndarray              # shaped like x
    inv_std: np.ndarray            # (N, G, 1, 1, ...): one per group of each sample
    gamma: np.ndarray              # (1, C, 1, ..., 1)
    gamma_shape: Tuple[int, ...]
    G: int


def _grouped(a: np.ndarray, G: int) -> np.ndarray:
    """(N, C, *spatial) -> (N, G, C/G, *spatial)."""
    N, C = a.shape[:2]
    return a.reshape((N, G, C // G) + a.shape[2:])


def spatial_groupnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, G: int,
                              gn_param: Mapping[str, Any]) -> Tuple[np.ndarray, GroupNormCache]:
    """Group norm of ``x`` (N, C, H, W), or any (N, C, *spatial), with ``G`` groups dividing ``C``.

    Returns ``(out, cache)``, ``out`` shaped like ``x``.
    """
    fn = "spatial_groupnorm_forward"
    gn_param = param_dict(gn_param, "gn_param", fn)
    x = as_float_array(x, "x", fn)
    require_ndim(x, "x", fn, min_ndim=3, layout="N, C, *spatial")
    C = x.shape[1]
    if isinstance(G, bool) or not isinstance(G, (int, np.integer)) or G < 1:
        raise ValueError(f"{fn}: G (the number of groups) must be a positive integer, got {G!r}")
    if C % G != 0:
        raise ValueError(f"{fn}: G={G} groups must divide the {C} channels of x (shape {x.shape})")
    g, b = channel_affine(gamma, beta, x, fn)
    eps = get_positive(gn_param, "eps", 1e-5, "gn_param", fn)
    xg = _grouped(x, int(G))
    x_hat_g, _, _, inv_std = standardize(xg, tuple(range(2, xg.ndim)), eps)
    x_hat = x_hat_g.reshape(x.shape)
    return g * x_hat + b, GroupNormCache(x_hat, inv_std, g, np.shape(gamma), int(G))


def spatial_groupnorm_backward(dout: np.ndarray, cache: GroupNormCache
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`spatial_groupnorm_forward`.

    With ``g = dout * gamma`` viewed as (N, G, C/G, *spatial) and means over each group::

        dx     = (g - mean(g) - x_hat * mean(g * x_hat)) / sqrt(var_ng + eps)
        dgamma = sum_{n,h,w} dout * x_hat,     dbeta = sum_{n,h,w} dout

    Returns ``(dx, dgamma, dbeta)``, the last two in the shape gamma was given.
    """
    fn = "spatial_groupnorm_backward"
    check_cache(cache, GroupNormCache, fn)
    dout = check_dout(dout, cache.x_hat.shape, fn)
    dgamma, dbeta = affine_backward(dout, cache.x_hat, bn_axes(dout.ndim), cache.gamma_shape)
    gg = _grouped(dout * cache.gamma, cache.G)
    dx = standardize_backward(gg, _grouped(cache.x_hat, cache.G), cache.inv_std, tuple(range(2, gg.ndim)))
    return dx.reshape(dout.shape), dgamma, dbeta
