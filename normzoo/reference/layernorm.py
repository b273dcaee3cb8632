"""Layer Normalization (Ba, Kiros & Hinton, 2016): forward and hand-derived backward.

Each sample is normalized over its features, independently of the rest of the batch. As in torch's
``layer_norm``, the normalized axes are the trailing ones matching ``gamma.shape`` (the "normalized
shape"): for CS231n's ``x`` (N, D) with ``gamma`` (D,) that is one mean and variance per row::

    mu_i    = (1/D) sum_j x_ij
    var_i   = (1/D) sum_j (x_ij - mu_i)^2          (biased)
    out_ij  = gamma_j * (x_ij - mu_i) / sqrt(var_i + eps) + beta_j

``ln_param``: ``"eps"`` (default ``1e-5``). There is no train/test difference and no running
statistics.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Tuple

import numpy as np

from ._checks import (as_float_array, check_cache, check_dout, get_positive, param_dict, same_shape,
                      trailing_param)
from ._core import affine_backward, standardize, standardize_backward

__all__ = ["LayerNormCache", "layernorm_forward", "layernorm_backward"]


class LayerNormCache(NamedTuple):
    """What :func:`layernorm_forward` saves for the backward pass."""

    x_hat: np.ndarray
    inv_std: np.ndarray          # 1/sqrt(var + eps), one per sample (normalized axes kept as size 1)
    gamma: np.ndarray
    axes: Tuple[int, ...]        # the normalized (trailing) axes


def layernorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      ln_param: Mapping[str, Any]) -> Tuple[np.ndarray, LayerNormCache]:
    """Layer norm of ``x`` (N, D), or any ``(*batch, *gamma.shape)``, with ``gamma``/``beta`` of the
    normalized shape. Returns ``(out, cache)``, ``out`` shaped like ``x``."""
    fn = "layernorm_forward"
    ln_param = param_dict(ln_param, "ln_param", fn)
    x = as_float_array(x, "x", fn)
    gamma = as_float_array(gamma, "gamma", fn)
    axes = trailing_param(gamma, "gamma", x, fn)
    beta = as_float_array(beta, "beta", fn)
    same_shape(beta, "beta", gamma, "gamma", fn)
    eps = get_positive(ln_param, "eps", 1e-5, "ln_param", fn)
    x_hat, _, _, inv_std = standardize(x, axes, eps)
    out = gamma * x_hat + beta
    return out, LayerNormCache(x_hat, inv_std, gamma, axes)


def layernorm_backward(dout: np.ndarray, cache: LayerNormCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`layernorm_forward`.

    With ``g = dout * gamma`` and means over each sample's normalized axes (the same closed form as
    batch norm's, with the roles of the axes swapped)::

        dx     = (g - mean(g) - x_hat * mean(g * x_hat)) / sqrt(var + eps)
        dgamma = sum over the batch axes of dout * x_hat
        dbeta  = sum over the batch axes of dout

    Returns ``(dx, dgamma, dbeta)``.
    """
    fn = "layernorm_backward"
    check_cache(cache, LayerNormCache, fn)
    dout = check_dout(dout, cache.x_hat.shape, fn)
    batch_axes = tuple(range(dout.ndim - len(cache.axes)))
    dgamma, dbeta = affine_backward(dout, cache.x_hat, batch_axes, cache.gamma.shape)
    dx = standardize_backward(dout * cache.gamma, cache.x_hat, cache.inv_std, cache.axes)
    return dx, dgamma, dbeta
