"""Batch Normalization (Ioffe & Szegedy, 2015): forward and hand-derived backward, CS231n signatures.

For a mini-batch ``x`` of shape ``(N, D)``, per feature ``j``::

    mu_j    = (1/N) sum_i x_ij
    var_j   = (1/N) sum_i (x_ij - mu_j)^2          (biased, as in the paper and torch)
    x_hat   = (x - mu) / sqrt(var + eps)
    out     = gamma * x_hat + beta

``bn_param`` (a dict, updated in place):

- ``"mode"``: ``"train"`` (normalize with the batch statistics and update the running ones) or
  ``"test"`` (normalize with the running statistics). Required.
- ``"eps"``: default ``1e-5``.
- ``"momentum"``: default ``0.9``, **CS231n's convention**:
  ``running = momentum * running + (1 - momentum) * batch``, so 0.9 keeps 90% of the old value.
  torch's ``momentum=0.1`` is the same update (torch momentum = 1 - reference momentum).
- ``"running_mean"`` / ``"running_var"``: shape ``(D,)``; start at zeros / ones when absent and are
  written back after every training step. The running variance accumulates the biased batch
  variance (CS231n); set ``"unbiased": True`` to accumulate ``N/(N-1)`` times it, as torch does.

Spatial batch norm on ``(N, C, *spatial)`` reduces over the batch and the spatial axes per channel;
it is :func:`batchnorm_forward` applied to the input seen as ``(N * prod(spatial), C)``.
"""
from __future__ import annotations

from typing import Any, MutableMapping, NamedTuple, Tuple

import numpy as np

from ._checks import as_float_array, channel_affine, check_cache, check_dout, require_ndim
from ._core import affine_backward, read_bn_param, standardize, standardize_backward, update_running

__all__ = [
    "BatchNormCache",
    "SpatialBatchNormCache",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
]


class BatchNormCache(NamedTuple):
    """What :func:`batchnorm_forward` saves for the backward pass (all arrays of shape (N, D) or (1, D))."""

    x: np.ndarray
    mean: np.ndarray      # batch mean (train) or running mean (test), shape (1, D)
    var: np.ndarray       # matching variance, shape (1, D)
    std: np.ndarray       # sqrt(var + eps), shape (1, D)
    gamma: np.ndarray     # shape (1, D)
    x_hat: np.ndarray
    train: bool           # True: mean/var depend on x; False: they are constants
    gamma_shape: Tuple[int, ...]  # shape gamma was given in; dgamma/dbeta are returned in it


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      bn_param: MutableMapping[str, Any]) -> Tuple[np.ndarray, BatchNormCache]:
    """Batch norm of ``x`` (N, D) with scale ``gamma`` (D,) and shift ``beta`` (D,) (or both (1, D)).

    Returns ``(out, cache)`` with ``out`` of shape (N, D). In train mode the running statistics in
    ``bn_param`` are updated (see the module docstring for the momentum convention). Training needs
    at least two rows (one row per feature normalizes to zero, which torch also refuses).
    """
    fn = "batchnorm_forward"
    x = as_float_array(x, "x", fn)
    require_ndim(x, "x", fn, ndim=2, layout="N, D")
    g, b = channel_affine(gamma, beta, x, fn)
    return _batchnorm_rows(x, g, b, np.shape(gamma), bn_param, fn)


def _batchnorm_rows(x: np.ndarray, g: np.ndarray, b: np.ndarray, gamma_shape: Tuple[int, ...],
                    bn_param: MutableMapping[str, Any], fn: str) -> Tuple[np.ndarray, BatchNormCache]:
    """Batch norm of validated rows ``x`` (M, C) with ``g``, ``b`` of shape (1, C); errors name ``fn``."""
    M, C = x.shape
    state = read_bn_param(bn_param, "bn_param", C, x.dtype, fn)
    if state.train:
        if M < 2:
            raise ValueError(f"{fn}: training needs more than one value per channel, got x of shape {x.shape}")
        x_hat, mean, var, inv_std = standardize(x, (0,), state.eps)
        std = 1.0 / inv_std
        update_running(bn_param, state, mean[0], var[0], M, "bn_param", fn)
    else:
        mean, var = state.running_mean[None, :], state.running_var[None, :]
        std = np.sqrt(var + state.eps)
        x_hat = (x - mean) / std
    out = g * x_hat + b
    return out, BatchNormCache(x, mean, var, std, g, x_hat, state.train, gamma_shape)


def batchnorm_backward(dout: np.ndarray, cache: BatchNormCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`batchnorm_forward`, node by node through the computational graph.

    Forward graph (per feature, sums over the batch of ``N`` rows)::

        xc = x - mu,  var = (1/N) sum xc^2,  std = sqrt(var + eps),  x_hat = xc / std,
        out = gamma * x_hat + beta

    Backward, the reverse of each node::

        dbeta  = sum dout                  dgamma = sum dout * x_hat
        dx_hat = dout * gamma
        dstd   = -sum(dx_hat * xc) / std^2
        dvar   = dstd / (2 std)
        dxc    = dx_hat / std + 2 xc dvar / N
        dmu    = -sum dxc
        dx     = dxc + dmu / N

    In test mode ``mu`` and ``std`` are constants and ``dx = dx_hat / std``.
    Returns ``(dx, dgamma, dbeta)``: dx (N, D); dgamma, dbeta in the shape gamma was given.
    """
    fn = "batchnorm_backward"
    check_cache(cache, BatchNormCache, fn)
    dout = check_dout(dout, cache.x.shape, fn)
    dgamma, dbeta = affine_backward(dout, cache.x_hat, (0,), cache.gamma_shape)
    dx_hat = dout * cache.gamma
    if not cache.train:
        return dx_hat / cache.std, dgamma, dbeta
    N = dout.shape[0]
    xc = cache.x - cache.mean
    dstd = -np.sum(dx_hat * xc, axis=0, keepdims=True) / cache.std ** 2
    dvar = 0.5 * dstd / cache.std
    dxc = dx_hat / cache.std + 2.0 * xc * dvar / N
    dmu = -np.sum(dxc, axis=0, keepdims=True)
    dx = dxc + dmu / N
    return dx, dgamma, dbeta


def batchnorm_backward_alt(dout: np.ndarray, cache: BatchNormCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`batchnorm_forward` in the simplified closed form.

    Collecting the terms of :func:`batchnorm_backward` on paper (``g = dout * gamma``, means over
    the batch)::

        dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std

    Same result, two reductions and one elementwise pass. Returns ``(dx, dgamma, dbeta)``.
    """
    fn = "batchnorm_backward_alt"
    check_cache(cache, BatchNormCache, fn)
    dout = check_dout(dout, cache.x.shape, fn)
    dgamma, dbeta = affine_backward(dout, cache.x_hat, (0,), cache.gamma_shape)
    g = dout * cache.gamma
    if not cache.train:
        return g / cache.std, dgamma, dbeta
    return standardize_backward(g, cache.x_hat, 1.0 / cache.std, (0,)), dgamma, dbeta


class SpatialBatchNormCache(NamedTuple):
    """What :func:`spatial_batchnorm_forward` saves: the (N*S, C) batch-norm cache and the input layout."""

    inner: BatchNormCache
    shape: Tuple[int, ...]
    gamma_shape: Tuple[int, ...]


def _to_rows(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) -> (N * prod(spatial), C): channels last, everything else flattened into rows."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _from_rows(rows: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    channels_last = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return np.moveaxis(rows.reshape(channels_last), -1, 1)


def spatial_batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                              bn_param: MutableMapping[str, Any]
                              ) -> Tuple[np.ndarray, SpatialBatchNormCache]:
    """Spatial (convolutional) batch norm of ``x`` (N, C, H, W), or any (N, C, *spatial).

    Statistics per channel over the batch and all spatial positions (``N*H*W`` values each);
    ``gamma``/``beta`` of shape (C,) or (1, C, 1, 1). ``bn_param`` as in :func:`batchnorm_forward`.
    Returns ``(out, cache)``, ``out`` shaped like ``x``.
    """
    fn = "spatial_batchnorm_forward"
    x = as_float_array(x, "x", fn)
    require_ndim(x, "x", fn, min_ndim=3, layout="N, C, *spatial")
    C = x.shape[1]
    g, b = channel_affine(gamma, beta, x, fn)
    out_rows, inner = _batchnorm_rows(_to_rows(x), g.reshape(1, C), b.reshape(1, C), (C,), bn_param, fn)
    return _from_rows(out_rows, x.shape), SpatialBatchNormCache(inner, x.shape, np.shape(gamma))


def spatial_batchnorm_backward(dout: np.ndarray, cache: SpatialBatchNormCache
                               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`spatial_batchnorm_forward`: the batch-norm backward on the (N*S, C) view.

    Returns ``(dx, dgamma, dbeta)``, gradients of ``gamma``/``beta`` in the shape they were given.
    """
    fn = "spatial_batchnorm_backward"
    check_cache(cache, SpatialBatchNormCache, fn)
    dout = check_dout(dout, cache.shape, fn)
    dx_rows, dgamma, dbeta = batchnorm_backward_alt(_to_rows(dout), cache.inner)
    return (_from_rows(dx_rows, cache.shape), dgamma.reshape(cache.gamma_shape),
            dbeta.reshape(cache.gamma_shape))
