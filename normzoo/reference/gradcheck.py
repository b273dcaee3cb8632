"""Numerical gradients by centered differences, and a one-call check of a forward/backward pair.

The first three functions keep CS231n's names, signatures and semantics:

- :func:`eval_numerical_gradient` -- gradient of a scalar function ``f(x)``;
- :func:`eval_numerical_gradient_array` -- ``d(sum(f(x) * df))/dx`` for an array-valued ``f``,
  i.e. the vector-Jacobian product a backward pass computes for upstream gradient ``df``;
- :func:`rel_error` -- the largest elementwise ``|x - y| / max(1e-8, |x| + |y|)``.

Both gradient functions perturb ``x`` in place, one element at a time, and restore it.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["eval_numerical_gradient", "eval_numerical_gradient_array", "rel_error", "check_layer"]


def _check_target(x: Any, fn: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{fn}: x must be a floating NumPy array (it is perturbed in place), got "
                        f"{type(x).__name__}{'' if not isinstance(x, np.ndarray) else ' of dtype ' + str(x.dtype)}")
    if not x.flags.writeable:
        raise ValueError(f"{fn}: x must be writeable (it is perturbed in place)")
    return x


def eval_numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, verbose: bool = False,
                            h: float = 1e-5) -> np.ndarray:
    """Gradient of the scalar function ``f`` at ``x``: ``(f(x + h e_i) - f(x - h e_i)) / (2h)``.

    Prints each index and its derivative when ``verbose``. Returns an array shaped like ``x``.
    """
    x = _check_target(x, "eval_numerical_gradient")
    grad = np.zeros_like(x)
    for ix in np.ndindex(*x.shape):
        old = x[ix]
        x[ix] = old + h
        fxph = float(f(x))
        x[ix] = old - h
        fxmh = float(f(x))
        x[ix] = old
        grad[ix] = (fxph - fxmh) / (2 * h)
        if verbose:
            print(ix, grad[ix])
    return grad


def eval_numerical_gradient_array(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, df: np.ndarray,
                                  h: float = 1e-5) -> np.ndarray:
    """Gradient of ``sum(f(x) * df)`` with respect to ``x`` by centered differences.

    ``df`` is the upstream gradient, shaped like ``f(x)``. Returns an array shaped like ``x``.
    """
    x = _check_target(x, "eval_numerical_gradient_array")
    grad = np.zeros_like(x)
    for ix in np.ndindex(*x.shape):
        old = x[ix]
        x[ix] = old + h
        pos = np.array(f(x), copy=True)
        x[ix] = old - h
        neg = np.array(f(x), copy=True)
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
    return grad


def rel_error(x: Any, y: Any) -> float:
    """Largest elementwise relative error ``|x - y| / max(1e-8, |x| + |y|)`` (CS231n's measure)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"rel_error: x and y must have the same shape, got {x.shape} and {y.shape}")
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))


Inputs = Union[Mapping[str, np.ndarray], Sequence[np.ndarray]]


def _named_inputs(forward: Callable[..., Any], inputs: Inputs) -> Tuple[Tuple[str, ...], list]:
    if isinstance(inputs, Mapping):
        return tuple(inputs), [np.array(v, dtype=np.float64) for v in inputs.values()]
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
        raise TypeError("check_layer: inputs must be a sequence or a dict of arrays, e.g. (x, gamma, beta)")
    try:
        params = [p.name for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = tuple(params[i] if i < len(params) else f"input{i}" for i in range(len(inputs)))
    return names, [np.array(v, dtype=np.float64) for v in inputs]


def check_layer(forward: Callable[..., Tuple[np.ndarray, Any]],
                backward: Callable[[np.ndarray, Any], Any],
                inputs: Inputs, *args: Any, dout: Optional[np.ndarray] = None, h: float = 1e-5,
                seed: int = 0) -> Dict[str, float]:
    """Compare a layer's analytic backward with numerical gradients; return the relative errors.

    ``forward(*inputs, *args)`` must return ``(out, cache)`` and ``backward(dout, cache)`` one
    gradient per input, in order (CS231n's convention). ``inputs`` are the differentiable
    arguments -- a sequence (named after ``forward``'s parameters) or a dict -- and ``args`` the
    rest (e.g. ``G`` and ``gn_param``). Inputs are copied to float64; ``args`` are deep-copied for
    every forward call, so a ``bn_param`` is not advanced by the probing (its running statistics
    stay those of the first call, which matters for Batch Renorm). ``dout`` defaults to a standard
    normal array drawn from ``seed``.

    Returns ``{name: rel_error(numerical, analytic)}``, e.g. ``{"x": 3e-10, "gamma": 1e-11, ...}``.
    """
    names, values = _named_inputs(forward, inputs)

    def run(vals: Sequence[np.ndarray]) -> np.ndarray:
        out, _ = forward(*vals, *copy.deepcopy(args))
        return out

    out, cache = forward(*values, *copy.deepcopy(args))
    if dout is None:
        # a stream of its own, so it never equals inputs drawn with default_rng(seed)
        dout = np.random.default_rng([seed, 0x5EED]).standard_normal(np.shape(out))
    dout = np.asarray(dout, dtype=np.float64)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(values):
        raise ValueError(f"check_layer: backward returned {len(grads)} gradients for {len(values)} inputs "
                         f"({', '.join(names)})")

    errors: Dict[str, float] = {}
    for i, name in enumerate(names):
        def f(v: np.ndarray, i: int = i) -> np.ndarray:
            vals = list(values)
            vals[i] = v
            return run(vals)

        numerical = eval_numerical_gradient_array(f, values[i], dout, h=h)
        if np.shape(grads[i]) != values[i].shape:
            raise ValueError(f"check_layer: the gradient of {name} has shape {np.shape(grads[i])}, "
                             f"the input has shape {values[i].shape}")
        errors[name] = rel_error(numerical, grads[i])
    return errors
