"""Native CPU kernels of EvoNorm-S0 and EvoNorm-B0 (``normzoo/_native/evonorm.c.in``), through
:func:`normzoo.native.entry`.

Built into the same library as the core kernels (:mod:`normzoo.native`); the caller checks
:func:`normzoo.native.supports` first. ``x`` is ``(N, C, *S)`` contiguous or channels_last (a contiguous
``(N, C)`` counts as channels_last with ``L = 1``); float32, float64 or bfloat16. Arithmetic is float32 for
float32 and bfloat16 input (float64 for float64), statistics float64; parameters are passed in the arithmetic
type and their gradients come back in it (``None`` where not asked for).

S0 (``y = gamma r x sigmoid(v x) + beta``, ``r = (var_(n, g) + eps)^-1/2``) is fused: each (sample, group)
block (each sample in channels_last) is read for its statistics and again, from cache, for the output;
backward likewise, keeping ``sigmoid(v x)`` of the block from its first pass to the second in a per-thread
buffer (blocks up to 1M values; larger ones compute it again). B0 (``y = gamma x / max(sigma_b, v x + sigma_i)
+ beta``) runs two passes each way: per-(n, c) moments (forward) or gradient sums (backward) over ``x``, the O(N C)
algebra in C, then the elementwise pass; in the contiguous layout a block of channels at a time, as BatchNorm, so
that the second pass reads the block from the cache.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from normzoo import native
from normzoo.native import _D, _I, _I64, _P  # the ctypes argument types of the signature tables
from normzoo.native import (_RUNNING_TYPES, BufferViews, _arith, _dims, _like, _ptr, _stats, _threads, _typed_param,
                            layout)

_SIGNATURES = {  # {suf}: one function per dtype; gamma, beta, v (and their gradients) as pointers + one type code
    "nz_s0_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I64, _I, _P, _P, _P, _I, _D, _P, _P, _I],
    "nz_s0_backward_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I64, _I, _P, _P, _I, _P, _P, _P, _P, _P, _I],
    "nz_b0_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _P, _P, _I, _D, _P, _I, _I, _D, _P, _I],
    "nz_b0_backward_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I, _P, _P, _I, _P, _I, _P, _P, _P, _I],
    "nz_evo_sigmoid_{suf}": [_P, _P, _I64],
}


def _fn(name: str, dtype: torch.dtype):
    return native.entry(f"nz_{name}_{{suf}}", dtype, _SIGNATURES)


def _typed(c: int, dtype: torch.dtype, *params: Optional[Tensor]) -> Tuple[Tuple[Optional[Tensor], ...], torch.dtype]:
    """The parameters as the kernels read them (:func:`normzoo.native._typed_param`), which take one type for all:
    as they are where they share one (a bfloat16 model's need no conversion), else all in the arithmetic type of
    ``dtype`` input; and that type."""
    a = _arith(dtype)
    typed = [_typed_param(t, c, a)[0] for t in params]
    kinds = {t.dtype for t in typed if t is not None}
    if len(kinds) > 1:
        typed = [None if t is None else t.to(a) for t in typed]
        kinds = {a}
    return tuple(typed), kinds.pop() if kinds else a


def _grads(c: int, dtype: torch.dtype, wanted: Tuple[bool, ...]) -> Tuple[Optional[Tensor], ...]:
    """Output buffers ``(C,)`` of ``dtype`` (the parameters' as the kernels read them) for the parameter gradients;
    ``None`` where not wanted."""
    out = torch.empty(len(wanted), c, dtype=dtype)
    return tuple(out[i] if want else None for i, want in enumerate(wanted))


def sigmoid(z: Tensor) -> Tensor:
    """The kernels' sigmoid of a contiguous CPU tensor (float32/bfloat16: the vectorized float one; float64:
    libm's ``exp``). For tests of its accuracy."""
    z = z.contiguous()
    out = torch.empty_like(z)
    _fn("evo_sigmoid", z.dtype)(z.data_ptr(), out.data_ptr(), z.numel())
    return out


def s0_forward(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor],
               eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """EvoNorm-S0 of ``x``: ``y`` (like ``x``) and the float64 ``(N, G)`` group ``mean`` and ``rstd``."""
    n, c, l = _dims(x)
    y = torch.empty_like(x)
    mean, rstd = _stats(2, n, groups)
    (g, b, vv), pdt = _typed(c, x.dtype, weight, bias, v)
    _fn("s0_forward", x.dtype)(x.data_ptr(), y.data_ptr(), n, c, l, groups, layout(x), _ptr(g), _ptr(b), _ptr(vv),
                               _RUNNING_TYPES[pdt], float(eps), mean.data_ptr(), rstd.data_ptr(), _threads(x.numel()))
    return y, mean, rstd


def s0_backward(dy: Tensor, x: Tensor, groups: int, weight: Optional[Tensor], v: Optional[Tensor], mean: Tensor,
                rstd: Tensor, wanted: Tuple[bool, bool, bool]) -> Tuple[Tensor, ...]:
    """Backward of :func:`s0_forward`: ``dx`` and, where ``wanted``, ``dgamma``, ``dbeta``, ``dv`` ``(C,)``."""
    n, c, l = _dims(x)
    dy = _like(x, dy)
    dx = torch.empty_like(x)
    (g, vv), pdt = _typed(c, x.dtype, weight, v)
    dg, db, dv = _grads(c, pdt, wanted)
    _fn("s0_backward", x.dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, l, groups, layout(x), _ptr(g),
                                _ptr(vv), _RUNNING_TYPES[pdt], mean.data_ptr(), rstd.data_ptr(), _ptr(dg), _ptr(db),
                                _ptr(dv),
                                _threads(x.numel()))
    return dx, dg, db, dv


class B0State(BufferViews):
    """Float64 views of what :func:`b0_forward` keeps for the backward (one buffer, ``2 N C + 3 C`` values):
    per (n, c) the instance mean ``mu_i`` and ``sigma_i = sqrt(var_i + eps)``; per channel the batch mean
    ``mu_b``, M2 ``m2_b`` (zeros for a fixed variance) and ``sigma_b``."""

    @staticmethod
    def _spans(n: int, c: int) -> Sequence[Tuple[str, int, Tuple[int, ...]]]:
        return [("mu_i", n * c, (n, c)), ("sigma_i", n * c, (n, c)), ("mu_b", c, (c,)), ("m2_b", c, (c,)),
                ("sigma_b", c, (c,))]


def b0_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor], eps: float,
               fixed_var: Optional[Tensor], running_var: Optional[Tensor] = None,
               momentum: float = 0.0) -> Tuple[Tensor, B0State]:
    """EvoNorm-B0 of ``x``: ``y`` and the :class:`B0State`. ``fixed_var`` ``(C,)``: the variance behind
    ``sigma_b`` (eval with running statistics; read in its dtype where the kernels take it, else as a float64
    copy); ``None``: the batch's biased variance, and then ``running_var`` (where
    :func:`normzoo.native.running_update_applies`) is updated in place with the unbiased one as
    ``running_var.lerp_(var, momentum)``."""
    n, c, l = _dims(x)
    y = torch.empty_like(x)
    buf = torch.empty(2 * n * c + 3 * c, dtype=torch.float64)
    if fixed_var is not None:
        run, rtype = _typed_param(fixed_var, c, torch.float64)
    elif running_var is not None:
        run, rtype = running_var, native._running_type(None, running_var)
    else:
        run, rtype = None, 0
    (g, b, vv), pdt = _typed(c, x.dtype, weight, bias, v)
    _fn("b0_forward", x.dtype)(x.data_ptr(), y.data_ptr(), n, c, l, layout(x), _ptr(g), _ptr(b), _ptr(vv),
                               _RUNNING_TYPES[pdt], float(eps), _ptr(run), rtype, int(fixed_var is None),
                               float(momentum), buf.data_ptr(), _threads(x.numel()))
    return y, B0State(buf, n, c)


def b0_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], v: Optional[Tensor], state: B0State,
                use_batch: bool, wanted: Tuple[bool, bool, bool]) -> Tuple[Tensor, ...]:
    """Backward of :func:`b0_forward`: ``dx`` and, where ``wanted``, ``dgamma``, ``dbeta``, ``dv`` ``(C,)``.
    ``use_batch``: ``sigma_b`` came from the batch (its gradient flows into ``dx``)."""
    n, c, l = _dims(x)
    dy = _like(x, dy)
    dx = torch.empty_like(x)
    (g, vv), pdt = _typed(c, x.dtype, weight, v)
    dg, db, dv = _grads(c, pdt, wanted)
    _fn("b0_backward", x.dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, l, layout(x), _ptr(g), _ptr(vv),
                                _RUNNING_TYPES[pdt], state.buf.data_ptr(), int(use_batch), _ptr(dg), _ptr(db), _ptr(dv),
                                _threads(x.numel()))
    return dx, dg, db, dv


__all__ = ["sigmoid", "s0_forward", "s0_backward", "b0_forward", "b0_backward", "B0State"]
