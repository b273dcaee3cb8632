"""RMSNorm (Zhang & Sennrich, 2019): forward and hand-derived backward.

Like layer norm without centering and without a shift: over the trailing axes matching
``gamma.shape`` (torch's ``normalized_shape``), with ``D`` elements each::

    rms   = sqrt((1/D) sum_j x_j^2 + eps)
    out_j = gamma_j * x_j / rms

``rms_param``: ``"eps"``; when absent or ``None`` it is the machine epsilon of the type the statistics
are computed in, as in torch's ``rms_norm(eps=None)``: ``x``'s dtype, float32 for float16 input. The signature
drops ``beta`` because the method has none.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Tuple

import numpy as np

from ._checks import as_float_array, check_cache, check_dout, get_positive, param_dict, trailing_param

__all__ = ["RMSNormCache", "rmsnorm_forward", "rmsnorm_backward"]


class RMSNormCache(NamedTuple):
    """What :func:`rmsnorm_forward` saves for the backward pass."""

    x_hat: np.ndarray          # x / rms
    inv_rms: np.ndarray        # 1 / rms, normalized axes kept as size 1
    gamma: np.ndarray
    axes: Tuple[int, ...]


def rmsnorm_forward(x: np.ndarray, gamma: np.ndarray,
                    rms_param: Mapping[str, Any]) -> Tuple[np.ndarray, RMSNormCache]:
    """RMSNorm of ``x`` (N, D), or any ``(*batch, *gamma.shape)``. Returns ``(out, cache)``."""
    fn = "rmsnorm_forward"
    rms_param = param_dict(rms_param, "rms_param", fn)
    x = as_float_array(x, "x", fn)
    gamma = as_float_array(gamma, "gamma", fn)
    axes = trailing_param(gamma, "gamma", x, fn)
    if rms_param.get("eps") is None:
        eps = float(np.finfo(np.promote_types(x.dtype, np.float32)).eps)
    else:
        eps = get_positive(rms_param, "eps", 0.0, "rms_param", fn)
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
    x_hat = x * inv_rms
    return gamma * x_hat, RMSNormCache(x_hat, inv_rms, gamma, axes)


def rmsnorm_backward(dout: np.ndarray, cache: RMSNormCache) -> Tuple[np.ndarray, np.ndarray]:
    """Backward of :func:`rmsnorm_forward`.

    With ``g = dout * gamma``, ``x_hat = x / rms`` and ``d rms / d x_j = x_j / (D rms)``::

        dx_j   = (g_j - x_hat_j * mean(g * x_hat)) / rms      (no mean term: nothing was centered)
        dgamma = sum over the batch axes of dout * x_hat

    Returns ``(dx, dgamma)``.
    """
    fn = "rmsnorm_backward"
    check_cache(cache, RMSNormCache, fn)
    dout = check_dout(dout, cache.x_hat.shape, fn)
    batch_axes = tuple(range(dout.ndim - len(cache.axes)))
    dgamma = np.sum(dout * cache.x_hat, axis=batch_axes)
    g = dout * cache.gamma
    dx = cache.inv_rms * (g - cache.x_hat * np.mean(g * cache.x_hat, axis=cache.axes, keepdims=True))
    return dx, dgamma
