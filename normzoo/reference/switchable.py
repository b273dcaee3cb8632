"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, 2018): forward and hand-derived backward.

One normalizer whose mean and variance are learned softmax mixtures of the instance, layer and batch
statistics (order ``k`` in ``SWITCH_ORDER = ("in", "ln", "bn")``). For ``x`` (N, C, H, W) with
``M = H*W`` positions, only the instance statistics are computed from ``x``; the others are merged
from them, as in the paper::

    mu_IN[n,c]  = mean_{h,w} x,             var_IN[n,c] = mean_{h,w} (x - mu_IN)^2
    mu_LN[n]    = mean_c mu_IN,             var_LN[n]   = mean_c (var_IN + mu_IN^2) - mu_LN^2
    mu_BN[c]    = mean_n mu_IN,             var_BN[c]   = mean_n (var_IN + mu_IN^2) - mu_BN^2

    p = softmax(mean_weight),  q = softmax(var_weight)
    mu  = p_IN mu_IN + p_LN mu_LN + p_BN mu_BN
    var = q_IN var_IN + q_LN var_LN + q_BN var_BN
    out = gamma * (x - mu) / sqrt(var + eps) + beta

The merged variances are computed in the algebraically identical form
``mean(var_IN) + mean((mu_IN - mu_merged)^2)`` (Chan's merge for equal counts), which does not
lose precision when the mean is large compared with the spread, as ``E[x^2] - E[x]^2`` does.

``sn_param`` (a dict, updated in place) is a ``bn_param`` for the batch statistics: ``"mode"``
(required; in ``"test"`` mode ``mu_BN``/``var_BN`` are the running statistics), ``"eps"`` (1e-5),
``"momentum"`` (0.9, CS231n convention: the fraction of the old value kept), ``"running_mean"``/
``"running_var"`` (zeros/ones; biased ``var_BN`` unless ``"unbiased": True``). The official code
uses the same form of update, with momentum 0.997.

Input: (N, C, *spatial) with more than one spatial position; ``gamma``/``beta`` (C,) or
(1, C, 1, ..., 1); ``mean_weight``/``var_weight``: the 3 mixing logits each, in SWITCH_ORDER.
"""
from __future__ import annotations

from typing import Any, MutableMapping, NamedTuple, Tuple

import numpy as np

from ._checks import as_float_array, channel_affine, check_cache, check_dout, require_instances
from ._core import (affine_backward, as_channel, bn_axes, read_bn_param, softmax, softmax_backward,
                    spatial_axes, update_running)

__all__ = ["SWITCH_ORDER", "SwitchNormCache", "switchnorm_forward", "switchnorm_backward"]

SWITCH_ORDER = ("in", "ln", "bn")


class SwitchNormCache(NamedTuple):
    """What :func:`switchnorm_forward` saves for the backward pass (statistics keep reduced axes)."""

    x: np.ndarray
    x_hat: np.ndarray
    inv_std: np.ndarray                     # (N, C, 1, ...)
    means: Tuple[np.ndarray, ...]           # mu_IN (N,C,1..), mu_LN (N,1,1..), mu_BN (1,C,1..)
    p: np.ndarray                           # softmax(mean_weight)
    q: np.ndarray                           # softmax(var_weight)
    var_stats: Tuple[np.ndarray, ...]       # var_IN, var_LN, var_BN
    gamma: np.ndarray                       # (1, C, 1, ...)
    gamma_shape: Tuple[int, ...]
    train: bool


def _merge(mu_in: np.ndarray, var_in: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the union of equal-sized groups with statistics ``mu_in``, ``var_in``."""
    mu = mu_in.mean(axis=axis, keepdims=True)
    var = np.mean(var_in + (mu_in - mu) ** 2, axis=axis, keepdims=True)
    return mu, var


def _logits(w: Any, name: str, fn: str) -> np.ndarray:
    arr = as_float_array(w, name, fn)
    if arr.shape != (len(SWITCH_ORDER),):
        raise ValueError(f"{fn}: {name} must have shape (3,) (logits for {', '.join(SWITCH_ORDER)}), "
                         f"got {arr.shape}")
    return arr


def switchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean_weight: np.ndarray,
                       var_weight: np.ndarray, sn_param: MutableMapping[str, Any]
                       ) -> Tuple[np.ndarray, SwitchNormCache]:
    """Switchable norm of ``x`` (N, C, *spatial). Returns ``(out, cache)``."""
    fn = "switchnorm_forward"
    x = as_float_array(x, "x", fn)
    require_instances(x, fn)
    g, b = channel_affine(gamma, beta, x, fn)
    p = softmax(_logits(mean_weight, "mean_weight", fn))
    q = softmax(_logits(var_weight, "var_weight", fn))
    state = read_bn_param(sn_param, "sn_param", x.shape[1], x.dtype, fn)

    sp = spatial_axes(x.ndim)
    mu_in = x.mean(axis=sp, keepdims=True)
    var_in = np.mean((x - mu_in) ** 2, axis=sp, keepdims=True)
    mu_ln, var_ln = _merge(mu_in, var_in, axis=1)
    if state.train:
        mu_bn, var_bn = _merge(mu_in, var_in, axis=0)
        update_running(sn_param, state, mu_bn.reshape(-1), var_bn.reshape(-1), x.size // x.shape[1],
                       "sn_param", fn)
    else:
        mu_bn, var_bn = as_channel(state.running_mean, x.ndim), as_channel(state.running_var, x.ndim)

    means, var_stats = (mu_in, mu_ln, mu_bn), (var_in, var_ln, var_bn)
    mean = sum(pk * m for pk, m in zip(p, means))
    var = sum(qk * v for qk, v in zip(q, var_stats))
    inv_std = 1.0 / np.sqrt(var + state.eps)
    x_hat = (x - mean) * inv_std
    out = g * x_hat + b
    return out, SwitchNormCache(x, x_hat, inv_std, means, p, q, var_stats, g, np.shape(gamma), state.train)


def switchnorm_backward(dout: np.ndarray, cache: SwitchNormCache
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`switchnorm_forward`, stage by stage in reverse.

    1. Normalization, per (n, c) with sums over the spatial positions (``g = dout * gamma``,
       ``s = 1/sqrt(var + eps)``)::

           dx   = g * s    (the direct path)
           dmu  = -s sum g,        dvar = -(s^2 / 2) sum g * x_hat

    2. Mixtures: ``dp_k = sum_{n,c} dmu * mu_k``, ``dmean_weight = p * (dp - p . dp)`` (softmax),
       likewise for ``var_weight``; the statistics get ``p_k dmu`` / ``q_k dvar`` summed over the
       axes they were broadcast along (LN over c, BN over n).
    3. Merges (LN shown; BN is the same over n, and in test mode BN statistics are constants)::

           dvar_IN += dvar_LN / C,   dmu_IN += (dmu_LN + 2 (mu_IN - mu_LN) dvar_LN) / C

    4. Instance statistics to the input (``M`` spatial positions)::

           dx += dmu_IN / M + 2 (x - mu_IN) dvar_IN / M

    Returns ``(dx, dgamma, dbeta, dmean_weight, dvar_weight)``.
    """
    fn = "switchnorm_backward"
    check_cache(cache, SwitchNormCache, fn)
    dout = check_dout(dout, cache.x.shape, fn)
    N, C = dout.shape[:2]
    sp = spatial_axes(dout.ndim)
    M = int(np.prod(dout.shape[2:]))
    dgamma, dbeta = affine_backward(dout, cache.x_hat, bn_axes(dout.ndim), cache.gamma_shape)

    g = dout * cache.gamma
    dx = g * cache.inv_std
    dmu = -cache.inv_std * np.sum(g, axis=sp, keepdims=True)
    dvar = -0.5 * cache.inv_std ** 2 * np.sum(g * cache.x_hat, axis=sp, keepdims=True)

    dp = np.array([np.sum(dmu * m) for m in cache.means])
    dq = np.array([np.sum(dvar * v) for v in cache.var_stats])
    dmean_weight = softmax_backward(dp, cache.p)
    dvar_weight = softmax_backward(dq, cache.q)

    mu_in, mu_ln, mu_bn = cache.means
    dmu_in = cache.p[0] * dmu
    dvar_in = cache.q[0] * dvar
    merged = [(1, C, mu_ln, cache.p[1], cache.q[1])]
    if cache.train:
        merged.append((0, N, mu_bn, cache.p[2], cache.q[2]))
    for axis, count, mu_k, pk, qk in merged:
        dmu_k = pk * np.sum(dmu, axis=axis, keepdims=True)
        dvar_k = qk * np.sum(dvar, axis=axis, keepdims=True)
        dvar_in = dvar_in + dvar_k / count
        dmu_in = dmu_in + (dmu_k + 2.0 * (mu_in - mu_k) * dvar_k) / count

    dx = dx + dmu_in / M + 2.0 * (cache.x - mu_in) * dvar_in / M
    return dx, dgamma, dbeta, dmean_weight, dvar_weight
