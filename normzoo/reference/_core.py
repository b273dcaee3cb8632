"""The two computations every reference layer shares: standardize over some axes, and its backward.

Forward, over a set of reduction axes ``A`` with ``m`` elements per group::

    mu    = mean_A(x)
    var   = mean_A((x - mu)^2)            (biased, two-pass: no E[x^2] - E[x]^2 cancellation)
    x_hat = (x - mu) / sqrt(var + eps)

Backward. Given ``g = dL/dx_hat`` and ``s = 1/sqrt(var + eps)``, the chain rule through ``mu`` and
``var`` collapses (see :func:`standardize_backward`) to::

    dx = s * (g - mean_A(g) - x_hat * mean_A(g * x_hat))

It also holds the running-statistics update in the CS231n convention and a softmax for the
mixing weights of Switchable Normalization.
"""
from __future__ import annotations

from typing import Any, MutableMapping, NamedTuple, Sequence, Tuple

import numpy as np

from ._checks import get_mode, get_momentum, get_positive, get_running, param_dict


def spatial_axes(ndim: int) -> Tuple[int, ...]:
    """Instance-norm reduction axes of an (N, C, *spatial) array: the spatial ones."""
    return tuple(range(2, ndim))


def bn_axes(ndim: int) -> Tuple[int, ...]:
    """Batch-norm reduction axes of an (N, C, *spatial) array: every axis but the channel axis 1."""
    return (0,) + spatial_axes(ndim)


def as_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) vector reshaped to (1, C, 1, ..., 1) so it broadcasts against an (N, C, *spatial) array."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def standardize(x: np.ndarray, axes: Sequence[int], eps: float
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalize ``x`` to zero mean and unit (biased) variance over ``axes``.

    Returns ``(x_hat, mean, var, inv_std)``; the statistics keep the reduced axes (size 1) so
    they broadcast against ``x``.
    """
    axes = tuple(axes)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    return centered * inv_std, mean, var, inv_std


def standardize_backward(g: np.ndarray, x_hat: np.ndarray, inv_std: np.ndarray,
                         axes: Sequence[int]) -> np.ndarray:
    """Gradient of ``L`` with respect to ``x`` given ``g = dL/dx_hat`` for ``x_hat = standardize(x)``.

    Derivation (``m`` elements per group, ``s = 1/sqrt(var + eps)``, all sums over the group)::

        x_hat_i = (x_i - mu) s
        dmu/dx_j   = 1/m
        dvar/dx_j  = 2 (x_j - mu) / m
        ds/dvar    = -s^3 / 2
        dx_j = s g_j - (s/m) sum_i g_i - (s/m) x_hat_j sum_i g_i x_hat_i

    the middle term from the mean, the last from the variance (its own mean path sums to zero).
    """
    axes = tuple(axes)
    mean_g = g.mean(axis=axes, keepdims=True)
    mean_gx = np.mean(g * x_hat, axis=axes, keepdims=True)
    return inv_std * (g - mean_g - x_hat * mean_gx)


def affine_backward(dout: np.ndarray, normalized: np.ndarray, axes: Sequence[int],
                    param_shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients of ``out = gamma * normalized + beta``: ``(dgamma, dbeta)`` in ``param_shape``.

    ``axes`` are the axes ``gamma`` is broadcast along (summed over in the backward pass).
    """
    axes = tuple(axes)
    dgamma = np.sum(dout * normalized, axis=axes).reshape(param_shape)
    dbeta = np.sum(dout, axis=axes).reshape(param_shape)
    return dgamma, dbeta


def softmax(w: np.ndarray) -> np.ndarray:
    """Softmax of a 1-D vector of logits (shifted by the maximum for stability)."""
    e = np.exp(w - np.max(w))
    return e / e.sum()


def softmax_backward(dp: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Gradient through ``p = softmax(w)``: ``dw_j = p_j (dp_j - sum_k p_k dp_k)``."""
    return p * (dp - np.dot(p, dp))


class BNState(NamedTuple):
    """The validated contents of a ``bn_param``-style dict."""

    train: bool
    eps: float
    running_mean: np.ndarray   # (C,)
    running_var: np.ndarray    # (C,)


def read_bn_param(param: Any, name: str, num_channels: int, dtype: np.dtype, fn: str) -> BNState:
    """Validate a ``bn_param``-style dict (mode, eps, momentum, running statistics) before any work.

    Running mean and variance default to zeros and ones. CS231n's starter code starts
    ``running_var`` at zeros; here it starts at ones, as in torch and the BN paper, so that test
    mode before any training step is an identity map instead of a division by ``sqrt(eps)``.
    """
    param = param_dict(param, name, fn)
    mode = get_mode(param, name, fn)
    eps = get_positive(param, "eps", 1e-5, name, fn)
    get_momentum(param, name, fn)
    running_mean = get_running(param, "running_mean", num_channels, 0.0, dtype, name, fn)
    running_var = get_running(param, "running_var", num_channels, 1.0, dtype, name, fn)
    return BNState(mode == "train", eps, running_mean, running_var)


def update_running(param: MutableMapping[str, Any], state: BNState, batch_mean: np.ndarray,
                   batch_var: np.ndarray, count: int, name: str, fn: str) -> None:
    """Store the new running statistics into ``param`` (new arrays; the old ones are not mutated).

    ``batch_mean``/``batch_var`` have shape (C,); ``count`` is the number of values behind each.

    CS231n convention: ``running = momentum * running + (1 - momentum) * batch`` with
    ``param["momentum"]`` defaulting to 0.9, i.e. 90% of the old value is kept. torch writes the same
    update as ``(1 - momentum) * running + momentum * batch`` with ``momentum=0.1``: reference
    momentum ``m`` equals torch momentum ``1 - m``.

    ``batch_var`` is the biased variance (the one used to normalize), as in CS231n. With
    ``param["unbiased"] = True`` it is multiplied by ``count / (count - 1)`` before the update,
    which is what torch stores in ``running_var``.
    """
    momentum = get_momentum(param, name, fn)
    unbiased = param.get("unbiased", False)
    if not isinstance(unbiased, (bool, np.bool_)):
        raise ValueError(f"{fn}: {name}['unbiased'] must be True or False, got {unbiased!r}")
    var = batch_var * (count / (count - 1)) if unbiased else batch_var
    param["running_mean"] = momentum * state.running_mean + (1.0 - momentum) * batch_mean
    param["running_var"] = momentum * state.running_var + (1.0 - momentum) * var
