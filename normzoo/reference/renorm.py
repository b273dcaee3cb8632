"""Batch Renormalization (Ioffe, 2017): forward and hand-derived backward.

Batch norm whose training output is corrected towards the running statistics, so that training and
inference compute the same function. Per channel, with batch statistics ``mu_B``, ``var_B`` over
the batch (and spatial) axes and running statistics ``mu``, ``var``::

    sigma_B = sqrt(var_B + eps),   sigma = sqrt(var + eps)
    r       = clip(sigma_B / sigma, 1/r_max, r_max)
    d       = clip((mu_B - mu) / sigma, -d_max, d_max)
    x_hat   = (x - mu_B) / sigma_B
    out     = gamma * (x_hat * r + d) + beta          (train)
    out     = gamma * (x - mu) / sigma + beta         (test)

``r`` and ``d`` are treated as constants in the backward pass (the paper's stop-gradient). Without
clipping, ``x_hat * r + d = (x - mu) / sigma`` exactly; with ``r_max = 1, d_max = 0`` the layer is
plain batch norm. The running statistics are updated *after* ``r`` and ``d`` are computed.

``brn_param`` (a dict, updated in place) holds what ``bn_param`` holds for
:func:`~normzoo.reference.batchnorm.batchnorm_forward` -- ``"mode"`` (required), ``"eps"``
(1e-5), ``"momentum"`` (0.9, CS231n convention: the fraction of the old value kept),
``"running_mean"``/``"running_var"`` (zeros/ones), ``"unbiased"`` (False) -- plus ``"r_max"``
(default 3.0) and ``"d_max"`` (default 5.0), the final values of the paper's schedule (it ramps them
up from 1 and 0; the caller changes them between steps to follow a schedule).

The paper keeps moving averages of ``mu`` and ``sigma``; like torch-style BN layers this reference
keeps the running *variance* and uses ``sigma = sqrt(running_var + eps)``, so its state is the
same as batch norm's.

Input: (N, C) or (N, C, *spatial); ``gamma``/``beta`` (C,) or (1, C, 1, ..., 1).
"""
from __future__ import annotations

import math
from typing import Any, MutableMapping, NamedTuple, Tuple

import numpy as np

from ._checks import as_float_array, channel_affine, check_cache, check_dout, require_ndim
from ._core import (affine_backward, as_channel, bn_axes, read_bn_param, standardize, standardize_backward,
                    update_running)

__all__ = ["BatchRenormCache", "batchrenorm_forward", "batchrenorm_backward"]


class BatchRenormCache(NamedTuple):
    """What :func:`batchrenorm_forward` saves for the backward pass."""

    x_hat: np.ndarray     # train: (x - mu_B) / sigma_B;  test: (x - mu) / sigma
    inv_std: np.ndarray   # train: 1 / sigma_B;  test: 1 / sigma;  shape (1, C, 1, ...)
    r: np.ndarray         # (1, C, 1, ...); ones in test mode
    d: np.ndarray         # (1, C, 1, ...); zeros in test mode
    gamma: np.ndarray     # (1, C, 1, ...)
    gamma_shape: Tuple[int, ...]
    train: bool


def _clip_limit(brn_param: MutableMapping[str, Any], key: str, default: float, low: float, fn: str) -> float:
    value = brn_param.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < low:
        raise ValueError(f"{fn}: brn_param[{key!r}] must be a finite number >= {low}, got {value!r}")
    return float(value)


def batchrenorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                        brn_param: MutableMapping[str, Any]) -> Tuple[np.ndarray, BatchRenormCache]:
    """Batch renorm of ``x`` (N, C) or (N, C, *spatial). Returns ``(out, cache)``; ``cache.r`` and
    ``cache.d`` hold the correction used in this step."""
    fn = "batchrenorm_forward"
    x = as_float_array(x, "x", fn)
    require_ndim(x, "x", fn, min_ndim=2, layout="N, C, *spatial")
    g, b = channel_affine(gamma, beta, x, fn)
    state = read_bn_param(brn_param, "brn_param", x.shape[1], x.dtype, fn)
    r_max = _clip_limit(brn_param, "r_max", 3.0, 1.0, fn)
    d_max = _clip_limit(brn_param, "d_max", 5.0, 0.0, fn)
    axes = bn_axes(x.ndim)
    mu = as_channel(state.running_mean, x.ndim)
    sigma = np.sqrt(as_channel(state.running_var, x.ndim) + state.eps)

    if state.train:
        count = x.size // x.shape[1]
        if count < 2:
            raise ValueError(f"{fn}: training needs more than one value per channel, got x of shape {x.shape}")
        x_hat, mu_b, var_b, inv_std = standardize(x, axes, state.eps)
        sigma_b = np.sqrt(var_b + state.eps)
        r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
        d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
        update_running(brn_param, state, mu_b.reshape(-1), var_b.reshape(-1), count, "brn_param", fn)
        normalized = x_hat * r + d
    else:
        inv_std = 1.0 / sigma
        x_hat = (x - mu) * inv_std
        r, d = np.ones_like(sigma), np.zeros_like(sigma)
        normalized = x_hat
    out = g * normalized + b
    return out, BatchRenormCache(x_hat, inv_std, r, d, g, np.shape(gamma), state.train)


def batchrenorm_backward(dout: np.ndarray, cache: BatchRenormCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`batchrenorm_forward` with ``r`` and ``d`` held constant.

    Train mode (``g = dout * gamma * r``; means over the batch and spatial axes)::

        dx     = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma_B
        dgamma = sum dout * (x_hat * r + d),    dbeta = sum dout

    Test mode: ``dx = dout * gamma / sigma``. Returns ``(dx, dgamma, dbeta)``.
    """
    fn = "batchrenorm_backward"
    check_cache(cache, BatchRenormCache, fn)
    dout = check_dout(dout, cache.x_hat.shape, fn)
    axes = bn_axes(dout.ndim)
    dgamma, dbeta = affine_backward(dout, cache.x_hat * cache.r + cache.d, axes, cache.gamma_shape)
    g = dout * cache.gamma * cache.r
    if cache.train:
        dx = standardize_backward(g, cache.x_hat, cache.inv_std, axes)
    else:
        dx = g * cache.inv_std
    return dx, dgamma, dbeta
