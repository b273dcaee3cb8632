"""Native O(N*C) algebra of the mixture norms (``normzoo/_native/mixtures.c.in``), called through ctypes.

Switchable Normalization mixes IN, LN and BN statistics with softmax weights; Batch-Instance Normalization
blends BN and IN with a clamped gate. Both start from the per-(n, c) moments of the input (the core's
:func:`normzoo.native.moments`) and end in a per-(n, c) affine map (:func:`normzoo.native.affine`); their
backward is :func:`normzoo.native.grad_sums`, the algebra here, then :func:`normzoo.native.affine_grad`. This
module is the O(N*C) part in between: merges, mixing weights, coefficients and their gradients, in float64,
with the running statistics updated in place. Callers check :func:`normzoo.native.supports` first.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from normzoo import native
from normzoo.native import BufferViews, _param, _ptr, _running_type

_P, _I64, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {
    "nz_switch_coefs": [_I64, _I64, _I64, _P, _P, _P, _P, _P, _I, _I, _D, _P, _P, _D, _P, _P],
    "nz_switch_grad_coefs": [_I64, _I64, _I64, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P],
    "nz_bin_coefs": [_I64, _I64, _I64, _P, _P, _P, _P, _P, _I, _I, _D, _P, _P, _D, _P, _P],
    "nz_bin_grad_coefs": [_I64, _I64, _I64, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P],
}


def _lib() -> ctypes.CDLL:
    return native.declared(_SIGNATURES)


# -- Switchable Normalization's O(N C) mixing algebra (the passes over x are moments/affine/grad_sums) ----
class SwitchState(BufferViews):
    """Float64 views of what :func:`switch_coefs` writes. ``buf`` (what the backward needs): per (n, c)
    ``mean``, ``var``, ``rstd``; per sample ``mu_l``, ``var_l``; per channel ``mu_b``, ``m2_b``, ``var_b``; the
    mixing weights ``p`` (means) and ``q`` (variances), order IN, LN, BN. ``ab`` (forward only, may be
    ``None``): the affine map ``a``, ``b`` per (n, c)."""

    @staticmethod
    def _spans(n: int, c: int) -> Sequence[Tuple[str, int, Tuple[int, ...]]]:
        return [("mean", n * c, (n, c)), ("var", n * c, (n, c)), ("rstd", n * c, (n, c)), ("mu_l", n, (n,)),
                ("var_l", n, (n,)), ("mu_b", c, (c,)), ("m2_b", c, (c,)), ("var_b", c, (c,)), ("p", 3, (3,)),
                ("q", 3, (3,))]


def switch_coefs(rows_mean: Tensor, rows_m2: Tensor, count: int, logits: Tensor, running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], use_batch: bool, momentum: float, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float) -> SwitchState:
    """Switchable Normalization's statistics and affine map from the per-(n, c) moments (float64 ``(N, C)``,
    ``count`` positions each): the LN and BN moments merged from them (BN: from the running statistics
    when not ``use_batch``), mixed with ``softmax`` of ``logits`` (float64 ``(6,)``: mean logits, variance
    logits). With ``use_batch`` and running buffers (:func:`normzoo.native.running_update_applies`), those are updated in
    place with the batch's BN statistics."""
    n, c = rows_mean.shape
    buf = torch.empty(3 * n * c + 2 * n + 3 * c + 6, dtype=torch.float64)
    ab = torch.empty(2 * n * c, dtype=torch.float64)
    run_type = _running_type(running_mean, running_var)
    g, b = _param(weight, torch.float64, c), _param(bias, torch.float64, c)
    _lib().nz_switch_coefs(n, c, count, rows_mean.data_ptr(), rows_m2.data_ptr(), logits.data_ptr(),
                              _ptr(running_mean), _ptr(running_var), run_type, int(use_batch), float(momentum),
                              _ptr(g), _ptr(b), float(eps), buf.data_ptr(), ab.data_ptr())
    return SwitchState(buf, n, c, ab)


def switch_grad_coefs(rows_mean: Tensor, rows_m2: Tensor, count: int, use_batch: bool, weight: Optional[Tensor],
                      state: SwitchState, s1: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                            Tensor]:
    """The backward algebra of :func:`switch_coefs` from ``s1 = sum_S dy``, ``t = sum_S dy (x - mean)``
    (float64 ``(N, C)``): ``dgamma``, ``dbeta`` ``(C,)``, ``dlogits`` ``(6,)`` and the ``(N, C)`` coefficients of
    ``dx = k1 dy + k2 (x - mean) + k3``."""
    n, c = rows_mean.shape
    out = torch.empty(2 * c + 6 + 3 * n * c, dtype=torch.float64)
    dg, db, dl, k1, k2, k3 = out.split([c, c, 6, n * c, n * c, n * c])
    g = _param(weight, torch.float64, c)
    _lib().nz_switch_grad_coefs(n, c, count, rows_mean.data_ptr(), rows_m2.data_ptr(), int(use_batch), _ptr(g),
                                   state.buf.data_ptr(), s1.data_ptr(), t.data_ptr(), dg.data_ptr(), db.data_ptr(),
                                   dl.data_ptr(), k1.data_ptr(), k2.data_ptr(), k3.data_ptr())
    return dg, db, dl, k1.view(n, c), k2.view(n, c), k3.view(n, c)


# -- Batch-Instance Normalization's O(N C) blend algebra ------------------------------------------------
class BinState(BufferViews):
    """Float64 views of what :func:`bin_coefs` writes. ``buf`` (what the backward needs): per (n, c)
    ``rstd_i``, ``delta = mu_nc - mu_B``; per channel ``rstd_b``, the clamped gate ``g``, ``mu_b``, ``m2_b``.
    ``ab`` (forward only, may be ``None``): the affine map ``a``, ``b`` per (n, c), around the instance mean."""

    @staticmethod
    def _spans(n: int, c: int) -> Sequence[Tuple[str, int, Tuple[int, ...]]]:
        return [("rstd_i", n * c, (n, c)), ("delta", n * c, (n, c)), ("rstd_b", c, (c,)), ("g", c, (c,)),
                ("mu_b", c, (c,)), ("m2_b", c, (c,))]


def bin_coefs(rows_mean: Tensor, rows_m2: Tensor, count: int, rho: Tensor, running_mean: Optional[Tensor],
              running_var: Optional[Tensor], use_batch: bool, momentum: float, weight: Optional[Tensor],
              bias: Optional[Tensor], eps: float) -> BinState:
    """Batch-Instance Norm's per-(n, c) affine map from the instance moments (float64 ``(N, C)``, ``count``
    positions each): BN statistics merged from them (or the running ones when not ``use_batch``), the gate
    ``clamp(rho, 0, 1)``. With ``use_batch`` and running buffers, those are updated in place."""
    n, c = rows_mean.shape
    buf = torch.empty(2 * n * c + 4 * c, dtype=torch.float64)
    ab = torch.empty(2 * n * c, dtype=torch.float64)
    run_type = _running_type(running_mean, running_var)
    g, b, r = _param(weight, torch.float64, c), _param(bias, torch.float64, c), _param(rho, torch.float64, c)
    _lib().nz_bin_coefs(n, c, count, rows_mean.data_ptr(), rows_m2.data_ptr(), r.data_ptr(), _ptr(running_mean),
                           _ptr(running_var), run_type, int(use_batch), float(momentum), _ptr(g), _ptr(b), float(eps),
                           buf.data_ptr(), ab.data_ptr())
    return BinState(buf, n, c, ab)


def bin_grad_coefs(count: int, use_batch: bool, weight: Optional[Tensor], state: BinState, s1: Tensor,
                   t: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward algebra of :func:`bin_coefs` from ``s1 = sum_S dy``, ``t = sum_S dy (x - mu_nc)``:
    ``dgamma``, ``dbeta``, ``drho`` ``(C,)`` and the ``(N, C)`` coefficients of ``dx = k1 dy + k2 (x - mu_nc) + k3``."""
    n, c = s1.shape
    out = torch.empty(3 * c + 3 * n * c, dtype=torch.float64)
    dg, db, dr, k1, k2, k3 = out.split([c, c, c, n * c, n * c, n * c])
    g = _param(weight, torch.float64, c)
    _lib().nz_bin_grad_coefs(n, c, count, int(use_batch), _ptr(g), state.buf.data_ptr(), s1.data_ptr(),
                                t.data_ptr(), dg.data_ptr(), db.data_ptr(), dr.data_ptr(), k1.data_ptr(),
                                k2.data_ptr(), k3.data_ptr())
    return dg, db, dr, k1.view(n, c), k2.view(n, c), k3.view(n, c)


__all__ = ["SwitchState", "switch_coefs", "switch_grad_coefs", "BinState", "bin_coefs", "bin_grad_coefs"]
