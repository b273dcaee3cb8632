"""Batch-Instance Normalization (Nam & Kim, 2018): forward and hand-derived backward.

A learned per-channel blend of the batch-normalized and the instance-normalized input::

    x_hat_BN = (x - mu_B) / sqrt(var_B + eps)      per channel over (N, *spatial)  [train]
             = (x - mu) / sqrt(var + eps)          with the running statistics      [test]
    x_hat_IN = (x - mu_nc) / sqrt(var_nc + eps)    per (n, c) over the spatial axes [always]
    out      = gamma * (rho * x_hat_BN + (1 - rho) * x_hat_IN) + beta

``rho`` (one per channel) must lie in [0, 1]; the paper keeps it there by clipping it after every
optimizer step, which is the caller's job -- this function refuses values outside the range
rather than clipping silently. ``rho = 1`` is batch norm, ``rho = 0`` instance norm.

``bin_param`` (a dict, updated in place) is a ``bn_param`` for the BN branch: ``"mode"``
(required), ``"eps"`` (1e-5), ``"momentum"`` (0.9, CS231n convention: the fraction of the old value
kept), ``"running_mean"``/``"running_var"`` (zeros/ones; biased batch variance unless
``"unbiased": True``).

Input: (N, C, *spatial) with more than one spatial position; ``gamma``, ``beta``, ``rho``: (C,) or
(1, C, 1, ..., 1).
"""
from __future__ import annotations

from typing import Any, MutableMapping, NamedTuple, Tuple

import numpy as np

from ._checks import as_float_array, channel_affine, channel_param, check_cache, check_dout, require_instances
from ._core import (affine_backward, as_channel, bn_axes, read_bn_param, spatial_axes, standardize,
                    standardize_backward, update_running)

__all__ = ["BatchInstanceNormCache", "batchinstancenorm_forward", "batchinstancenorm_backward"]


class BatchInstanceNormCache(NamedTuple):
    """What :func:`batchinstancenorm_forward` saves for the backward pass."""

    x_hat_bn: np.ndarray
    inv_std_bn: np.ndarray     # (1, C, 1, ...)
    x_hat_in: np.ndarray
    inv_std_in: np.ndarray     # (N, C, 1, ...)
    gamma: np.ndarray          # (1, C, 1, ...)
    rho: np.ndarray            # (1, C, 1, ...)
    gamma_shape: Tuple[int, ...]
    rho_shape: Tuple[int, ...]
    train: bool


def batchinstancenorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, rho: np.ndarray,
                              bin_param: MutableMapping[str, Any]
                              ) -> Tuple[np.ndarray, BatchInstanceNormCache]:
    """Batch-instance norm of ``x`` (N, C, *spatial). Returns ``(out, cache)``."""
    fn = "batchinstancenorm_forward"
    x = as_float_array(x, "x", fn)
    require_instances(x, fn)
    g, b = channel_affine(gamma, beta, x, fn)
    rh = channel_param(rho, "rho", x.shape[1], x.ndim, fn)
    if np.any(rh < 0) or np.any(rh > 1):
        raise ValueError(f"{fn}: rho must lie in [0, 1] (clip it after each optimizer step), "
                         f"got values in [{rh.min()}, {rh.max()}]")
    state = read_bn_param(bin_param, "bin_param", x.shape[1], x.dtype, fn)
    axes_bn = bn_axes(x.ndim)

    if state.train:
        x_hat_bn, mu_b, var_b, inv_std_bn = standardize(x, axes_bn, state.eps)
        update_running(bin_param, state, mu_b.reshape(-1), var_b.reshape(-1), x.size // x.shape[1],
                       "bin_param", fn)
    else:
        inv_std_bn = 1.0 / np.sqrt(as_channel(state.running_var, x.ndim) + state.eps)
        x_hat_bn = (x - as_channel(state.running_mean, x.ndim)) * inv_std_bn
    x_hat_in, _, _, inv_std_in = standardize(x, spatial_axes(x.ndim), state.eps)
    out = g * (rh * x_hat_bn + (1.0 - rh) * x_hat_in) + b
    return out, BatchInstanceNormCache(x_hat_bn, inv_std_bn, x_hat_in, inv_std_in, g, rh, np.shape(gamma),
                                       np.shape(rho), state.train)


def batchinstancenorm_backward(dout: np.ndarray, cache: BatchInstanceNormCache
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`batchinstancenorm_forward`.

    With ``g = dout * gamma``, each branch gets its share and goes through its own standardization
    backward (BN: means over (N, *spatial); IN: means over *spatial)::

        dx     = std_backward_BN(rho * g) + std_backward_IN((1 - rho) * g)
        drho   = sum_{n, spatial} g * (x_hat_BN - x_hat_IN)
        dgamma = sum_{n, spatial} dout * (rho * x_hat_BN + (1 - rho) * x_hat_IN),  dbeta = sum dout

    where ``std_backward(h) = (h - mean(h) - x_hat * mean(h * x_hat)) / sigma``; in test mode the BN
    branch is the constant map ``h / sigma``. Returns ``(dx, dgamma, dbeta, drho)``.
    """
    fn = "batchinstancenorm_backward"
    check_cache(cache, BatchInstanceNormCache, fn)
    dout = check_dout(dout, cache.x_hat_in.shape, fn)
    axes_bn, axes_in = bn_axes(dout.ndim), spatial_axes(dout.ndim)
    rho = cache.rho
    mixed = rho * cache.x_hat_bn + (1.0 - rho) * cache.x_hat_in
    dgamma, dbeta = affine_backward(dout, mixed, axes_bn, cache.gamma_shape)
    g = dout * cache.gamma
    drho = np.sum(g * (cache.x_hat_bn - cache.x_hat_in), axis=axes_bn).reshape(cache.rho_shape)
    if cache.train:
        dx = standardize_backward(rho * g, cache.x_hat_bn, cache.inv_std_bn, axes_bn)
    else:
        dx = rho * g * cache.inv_std_bn
    dx = dx + standardize_backward((1.0 - rho) * g, cache.x_hat_in, cache.inv_std_in, axes_in)
    return dx, dgamma, dbeta, drho
