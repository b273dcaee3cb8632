"""The mixture norms on the native kernels (``normzoo/_native/mixtures.c.in``), one kernel call each way.

Switchable Normalization mixes IN, LN and BN statistics with softmax weights; Batch-Instance Normalization
blends BN and IN with a clamped gate. Both start from the per-(n, c) moments of the input and end in a
per-(n, c) affine map; their backward takes the two sums of ``dy``, then the ``dx`` map. In between is O(N*C)
algebra (merges, mixing weights, coefficients and their gradients) in float64, with the running statistics
updated in place. Each direction is one C call: the passes over ``x`` and the algebra together, the parameters
read and their gradients written in their own dtypes, because at small sizes the Python glue between separate
calls (conversions, views, allocations) cost as much as the passes. Callers check
:func:`normzoo.native.supports` first.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from normzoo import native
from normzoo._autograd import grad_as
from normzoo.native import _D, _I, _I64, _P, _ptr, _running_type  # _D.._P: the signature tables' ctypes types

_SIGNATURES = {
    "nz_switch_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _I, _P, _I, _P, _P, _I, _I, _D, _P, _I, _P, _I, _D, _P,
                                _I],
    "nz_switch_backward_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I, _I, _P, _I, _P, _P, _I, _P, _I, _P, _I, _P, _I, _I],
    "nz_bin_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _I, _P, _P, _I, _I, _D, _P, _I, _P, _I, _D, _P, _I],
    "nz_bin_backward_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I, _I, _P, _I, _P, _P, _I, _P, _I, _P, _I, _I],
    # the float64 block a forward keeps for its backward, in values, for (N, C)
    "nz_switch_keep_size": ([_I64, _I64], _I64),
    "nz_bin_keep_size": ([_I64, _I64], _I64),
}


def _fn(name: str, dtype: torch.dtype):
    return native.entry(f"nz_{name}_{{suf}}", dtype, _SIGNATURES)


def _keep(kind: str, n: int, c: int) -> Tensor:
    """The float64 block that ``kind``'s (``"switch"``, ``"bin"``) forward keeps for its backward, sized by the
    kernels (``nz_<kind>_keep_size``)."""
    return torch.empty(native.entry(f"nz_{kind}_keep_size", None, _SIGNATURES)(n, c), dtype=torch.float64)


def _typed(t: Optional[Tensor], size: int) -> Tuple[Optional[Tensor], int]:
    """A parameter as the kernels read it (:func:`normzoo.native._typed_param`; other dtypes as float64)."""
    return native._typed_param(t, size, torch.float64)


def _grad_buffer(dtype: Optional[torch.dtype], size: int, wanted: bool) -> Tuple[Optional[Tensor], int]:
    """Where a kernel writes a parameter's gradient: a ``(size,)`` tensor of the parameter's ``dtype`` (float64
    for a dtype the kernels do not write; :func:`normzoo._autograd.grad_as` converts it), with its type code;
    ``(None, 0)`` for no parameter or an unwanted gradient."""
    if dtype is None or not wanted:
        return None, 0
    return native._typed_buffer(dtype, size, torch.float64)


def dtypes(*params: Optional[Tensor]) -> Tuple[Optional[torch.dtype], ...]:
    """The parameters' dtypes (``None`` for an absent one), which the backward functions take."""
    return tuple(None if t is None else t.dtype for t in params)


def _dims(x: Tensor) -> Tuple[int, int, int, Optional[int]]:
    """``N``, ``C``, the positions per (n, c) and the kernels' layout code of ``x``."""
    return (*native._dims(x), native.layout(x))


# -- Switchable Normalization: moments, mixing algebra, affine map (and back) in one call each way -------
def switch_forward(x: Tensor, mean_logits: Tensor, var_logits: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], use_batch: bool, momentum: float, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """Switchable Normalization of ``x`` ``(N, C, *S)``: the per-(n, c) moments, the LN and BN moments merged
    from them (BN: from the running statistics when not ``use_batch``), mixed with ``softmax`` of the ``(3,)``
    logits (order IN, LN, BN), and the affine map. With ``use_batch`` and running buffers
    (:func:`normzoo.native.running_update_applies`) those are updated in place with the batch's statistics.
    Returns ``y`` and the float64 block the backward needs (``nz_switch_keep_size``: ``2 N C + 2 N + 3 C + 7``
    values)."""
    n, c, l, lay = _dims(x)
    y = torch.empty_like(x)
    keep = _keep("switch", n, c)
    (ml, mlt), (vl, vlt) = _typed(mean_logits.detach(), 3), _typed(var_logits.detach(), 3)
    (g, gt), (b, bt) = _typed(weight, c), _typed(bias, c)
    _fn("switch_forward", x.dtype)(x.data_ptr(), y.data_ptr(), n, c, l, lay, ml.data_ptr(), mlt, vl.data_ptr(), vlt,
                                   _ptr(running_mean), _ptr(running_var), _running_type(running_mean, running_var),
                                   int(use_batch), float(momentum), _ptr(g), gt, _ptr(b), bt, float(eps),
                                   keep.data_ptr(), native._threads(x.numel()))
    return y, keep


def switch_backward(dy: Tensor, x: Tensor, keep: Tensor, use_batch: bool, weight: Optional[Tensor],
                    param_dtypes: Sequence[Optional[torch.dtype]], wanted: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """The backward of :func:`switch_forward` from its block ``keep``: the gradients of ``x``, ``weight``,
    ``bias``, ``mean_logits`` and ``var_logits`` where ``wanted`` (five flags; ``None`` elsewhere), each in
    its input's dtype (``param_dtypes``: :func:`dtypes` of the last four)."""
    n, c, l, lay = _dims(x)
    dy = native._like(x, dy)
    dx = torch.empty_like(x) if wanted[0] else None
    g, gt = _typed(weight, c)
    outs = [_grad_buffer(dt, size, want) for dt, size, want in zip(param_dtypes, (c, c, 3, 3), wanted[1:])]
    _fn("switch_backward", x.dtype)(dy.data_ptr(), x.data_ptr(), _ptr(dx), n, c, l, lay, int(use_batch), _ptr(g), gt,
                                    keep.data_ptr(), *[v for t, code in outs for v in (_ptr(t), code)],
                                    native._threads(x.numel()))
    return (dx, *(grad_as(t, dt) for (t, _), dt in zip(outs, param_dtypes)))


# -- Batch-Instance Normalization: moments, blend algebra, affine map (and back) in one call each way -----
def bin_forward(x: Tensor, rho: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                use_batch: bool, momentum: float, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float) -> Tuple[Tensor, Tensor]:
    """Batch-Instance Normalization of ``x`` ``(N, C, *S)``: the instance moments, BN statistics merged from
    them (or the running ones when not ``use_batch``), the gate ``clamp(rho, 0, 1)``, one affine map per
    (n, c). With ``use_batch`` and running buffers, those are updated in place. Returns ``y`` and the float64
    block the backward needs (``nz_bin_keep_size``: ``3 N C + 4 C`` values)."""
    n, c, l, lay = _dims(x)
    y = torch.empty_like(x)
    keep = _keep("bin", n, c)
    (r, rt), (g, gt), (b, bt) = _typed(rho.detach(), c), _typed(weight, c), _typed(bias, c)
    _fn("bin_forward", x.dtype)(x.data_ptr(), y.data_ptr(), n, c, l, lay, r.data_ptr(), rt, _ptr(running_mean),
                                _ptr(running_var), _running_type(running_mean, running_var), int(use_batch),
                                float(momentum), _ptr(g), gt, _ptr(b), bt, float(eps), keep.data_ptr(),
                                native._threads(x.numel()))
    return y, keep


def bin_backward(dy: Tensor, x: Tensor, keep: Tensor, use_batch: bool, weight: Optional[Tensor],
                 param_dtypes: Sequence[Optional[torch.dtype]], wanted: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """The backward of :func:`bin_forward` from its block ``keep``: the gradients of ``x``, ``weight``, ``bias``
    and ``rho`` (at the clamped gate) where ``wanted`` (four flags), each in its input's dtype
    (``param_dtypes``: :func:`dtypes` of the last three)."""
    n, c, l, lay = _dims(x)
    dy = native._like(x, dy)
    dx = torch.empty_like(x) if wanted[0] else None
    g, gt = _typed(weight, c)
    outs = [_grad_buffer(dt, c, want) for dt, want in zip(param_dtypes, wanted[1:])]
    _fn("bin_backward", x.dtype)(dy.data_ptr(), x.data_ptr(), _ptr(dx), n, c, l, lay, int(use_batch), _ptr(g), gt,
                                 keep.data_ptr(), *[v for t, code in outs for v in (_ptr(t), code)],
                                 native._threads(x.numel()))
    return (dx, *(grad_as(t, dt) for (t, _), dt in zip(outs, param_dtypes)))


__all__ = ["switch_forward", "switch_backward", "bin_forward", "bin_backward", "dtypes"]
