"""Input validation shared by the reference functions.

Every check raises a ``ValueError`` (wrong shape, wrong value) or a ``TypeError`` (wrong kind of
object, non-floating dtype) whose message names the function, what was expected and what was given.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import numpy as np

MODES = ("train", "test")


def as_float_array(a: Any, name: str, fn: str) -> np.ndarray:
    """Return ``a`` as a floating NumPy array (no copy when it already is one)."""
    if isinstance(a, np.ndarray):
        arr = a
    elif isinstance(a, (list, tuple, float, int, np.generic)):
        arr = np.asarray(a)
    else:
        raise TypeError(f"{fn}: {name} must be a NumPy array, got {type(a).__name__}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{fn}: {name} must have a floating dtype (float32/float64), got {arr.dtype}")
    return arr


def require_ndim(x: np.ndarray, name: str, fn: str, ndim: Optional[int] = None,
                 min_ndim: Optional[int] = None, layout: str = "") -> None:
    """Check the rank of ``x``: exactly ``ndim`` or at least ``min_ndim`` dimensions."""
    what = f" ({layout})" if layout else ""
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D{what}, got shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dimensions{what}, got shape {x.shape}")


def channel_param(p: Any, name: str, num_channels: int, ndim: int, fn: str) -> np.ndarray:
    """Validate a per-channel parameter and return it shaped ``(1, C, 1, ..., 1)`` (rank ``ndim``).

    Accepted shapes: ``(C,)`` (torch and the CS231n batch-norm functions) or ``(1, C, 1, ..., 1)`` of
    the input's rank (the CS231n group-norm functions). Gradients are returned in the shape given.
    """
    arr = as_float_array(p, name, fn)
    broadcast_shape = (1, num_channels) + (1,) * (ndim - 2)
    if arr.shape != (num_channels,) and arr.shape != broadcast_shape:
        raise ValueError(
            f"{fn}: {name} must have shape ({num_channels},) or {broadcast_shape} "
            f"(one value per channel of the input), got {arr.shape}"
        )
    return arr.reshape(broadcast_shape)


def trailing_param(p: Any, name: str, x: np.ndarray, fn: str) -> Tuple[int, ...]:
    """Check that ``x``'s trailing dimensions equal ``p.shape`` (torch's ``normalized_shape``).

    Returns the normalized axes of ``x`` (the last ``p.ndim`` ones).
    """
    arr = as_float_array(p, name, fn)
    k = arr.ndim
    if k == 0:
        raise ValueError(f"{fn}: {name} must have at least one dimension (the normalized shape), got a scalar")
    if x.ndim < k or x.shape[x.ndim - k:] != arr.shape:
        raise ValueError(
            f"{fn}: the trailing dimensions of x must equal {name}.shape = {arr.shape} "
            f"(the normalized shape), got x of shape {x.shape}"
        )
    return tuple(range(x.ndim - k, x.ndim))


def same_shape(a: np.ndarray, name: str, ref: np.ndarray, ref_name: str, fn: str) -> None:
    if a.shape != ref.shape:
        raise ValueError(f"{fn}: {name} must have the shape of {ref_name} {ref.shape}, got {a.shape}")


def check_dout(dout: Any, shape: Tuple[int, ...], fn: str) -> np.ndarray:
    """Validate the upstream gradient against the forward output's shape."""
    arr = as_float_array(dout, "dout", fn)
    if arr.shape != tuple(shape):
        raise ValueError(f"{fn}: dout must have the forward output's shape {tuple(shape)}, got {arr.shape}")
    return arr


def check_cache(cache: Any, cls: type, fn: str) -> None:
    if not isinstance(cache, cls):
        raise TypeError(f"{fn}: cache must be the {cls.__name__} returned by the matching forward, "
                        f"got {type(cache).__name__}")


def param_dict(param: Any, name: str, fn: str) -> Mapping[str, Any]:
    if not isinstance(param, Mapping):
        raise TypeError(f"{fn}: {name} must be a dict, got {type(param).__name__}")
    return param


def get_mode(param: Mapping[str, Any], name: str, fn: str) -> str:
    """``param["mode"]``: required, one of ``"train"`` / ``"test"``."""
    if "mode" not in param:
        raise ValueError(f"{fn}: {name}['mode'] is required: 'train' or 'test'")
    mode = param["mode"]
    if mode not in MODES:
        raise ValueError(f"{fn}: {name}['mode'] must be 'train' or 'test', got {mode!r}")
    return mode


def get_positive(param: Mapping[str, Any], key: str, default: float, name: str, fn: str) -> float:
    value = param.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: {name}[{key!r}] must be a positive finite number, got {value!r}")
    return float(value)


def get_momentum(param: Mapping[str, Any], name: str, fn: str, default: float = 0.9) -> float:
    value = param.get("momentum", default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name}['momentum'] must be a number in [0, 1] "
                         f"(the fraction of the old running value kept), got {value!r}")
    return float(value)


def get_running(param: Mapping[str, Any], key: str, num_channels: int, default: float,
                dtype: np.dtype, name: str, fn: str) -> np.ndarray:
    """Fetch ``param[key]`` (shape ``(C,)``) or a fresh array filled with ``default``."""
    if key not in param or param[key] is None:
        return np.full(num_channels, default, dtype=dtype)
    arr = as_float_array(param[key], f"{name}[{key!r}]", fn)
    if arr.shape != (num_channels,):
        raise ValueError(f"{fn}: {name}[{key!r}] must have shape ({num_channels},), got {arr.shape}")
    return arr


def channel_affine(gamma: Any, beta: Any, x: np.ndarray, fn: str) -> Tuple[np.ndarray, np.ndarray]:
    """Validate per-channel ``gamma`` and ``beta`` of the same shape for ``x`` (N, C, ...).

    Returns both shaped ``(1, C, 1, ..., 1)``.
    """
    g = channel_param(gamma, "gamma", x.shape[1], x.ndim, fn)
    b = channel_param(beta, "beta", x.shape[1], x.ndim, fn)
    if np.shape(gamma) != np.shape(beta):
        raise ValueError(f"{fn}: beta must have the shape of gamma {np.shape(gamma)}, got {np.shape(beta)}")
    return g, b


def require_instances(x: np.ndarray, fn: str) -> None:
    """An (N, C, *spatial) input whose instances have more than one spatial position."""
    require_ndim(x, "x", fn, min_ndim=3, layout="N, C, *spatial")
    if int(np.prod(x.shape[2:])) < 2:
        raise ValueError(f"{fn}: instance statistics need more than one spatial position per (n, c), "
                         f"got x of shape {x.shape}")
