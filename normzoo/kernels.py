"""The passes over full-size tensors: the only code in normzoo that touches every element.

Every channel-wise method (BN and its family, IN, GN, channel-first LN, SN, BIN, ...) is computed from
per-(sample, channel) quantities by four primitives, for an input ``x`` of shape ``(N, C, *S)`` (any
memory format; ``S`` may be empty), with per-(n, c) (or per-channel) coefficients:

1. :func:`prepare` -- per-(n, c) moments over ``S`` (forward pass 1, reads ``x``), plus the tensor that
   the other passes read (``x`` itself, or ``x`` centred per (n, c) when that row is ill-conditioned
   and the PyTorch fallback is in use, see :mod:`normzoo.stats`).
2. :func:`affine` -- ``y = a * (x - centre) + b`` (forward pass 2).
3. :func:`grad_sums` -- ``S1 = sum_S dy`` and ``S2 = sum_S dy * (x - centre)`` (backward pass 1).
4. :func:`affine_grad` -- ``dx = k1 * dy + k2 * (x - centre) + k3`` (backward pass 2).

Each dispatches to the native kernels (:mod:`normzoo.native`: compiled, vectorized, arithmetic in
float64, exact shifted sums) where they apply, and to stock PyTorch operations otherwise.

Everything between those passes is arithmetic on tensors of size ``N * C``. So any method costs what
BatchNorm costs, and only ``x`` (or its centred copy) plus ``O(N * C)`` statistics is saved for backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from normzoo import native
from normzoo.stats import Moments, accumulation_dtype, centered_moments, ill_conditioned, raw_moments


def spatial_dims(x: Tensor) -> Tuple[int, ...]:
    """The dims after ``(N, C)``."""
    return tuple(range(2, x.dim()))


def per_nc(t: Tensor, x: Tensor) -> Tensor:
    """View a ``(N, C)``, ``(1, C)`` or ``(C,)`` tensor so that it broadcasts against ``x`` of shape ``(N, C, *S)``."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return t.view(t.shape + (1,) * (x.dim() - 2))


@dataclass
class Prepared:
    """The result of :func:`prepare`.

    ``rows``: per-(n, c) moments (``mean``/``m2`` of shape ``(N, C)``, ``count = prod(S)``), exact.
    ``x``: the tensor the later passes read -- the input itself, or ``input - shift`` in the input dtype.
    ``shift``: ``None``, or the ``(N, C)`` per-row shift (accumulation dtype) that was subtracted.
    ``exact``: the row moments are float64 from shifted sums (native kernels): their merges need no guard.
    """

    rows: Moments
    x: Tensor
    shift: Optional[Tensor]
    exact: bool = False


def prepare(x: Tensor, shift: Optional[Tensor] = None) -> Prepared:
    """Per-(n, c) moments of ``x`` over its spatial dims, centring ill-conditioned rows.

    Reads ``x`` once (twice if some row needs centring, then also writes the centred copy). Rows are
    centred all together when any is ill-conditioned, around their own one-pass mean: the data then
    has a mean near 0 and the one-pass formula is exact to the accumulation precision. A caller may
    instead pass its own ``shift`` (``(N, C)`` or ``(1, C)``, e.g. a group mean when the rows hold a
    single element and only the group can tell that the data sits far from 0).
    """
    dims = spatial_dims(x)
    if shift is None and dims and native.supports(x):
        mean, m2 = native.moments(x)
        return Prepared(Moments(x.numel() // (x.shape[0] * x.shape[1]), mean, m2), x, None, exact=True)
    if shift is None:
        rows = raw_moments(x, dims, keepdim=False)
        if not dims or not bool(ill_conditioned(rows, x.dtype).any()):
            return Prepared(rows, x, None)
        shift = rows.mean
    return _prepare_shifted(x, shift)


def _prepare_shifted(x: Tensor, shift: Tensor) -> Prepared:
    dims = spatial_dims(x)
    if x.dtype not in (torch.float32, torch.float64):
        shift = shift.to(x.dtype)  # shift by a value the input dtype holds, and remember exactly that value
    xs = x - per_nc(shift.to(x.dtype), x)
    centred = raw_moments(xs, dims, keepdim=False)
    if dims and bool(ill_conditioned(centred, x.dtype).any()):  # still off (e.g. low precision): exact two-pass
        centred = centered_moments(xs, dims, per_nc(centred.mean, xs), keepdim=False)
    # mean = shift + (small centred mean) needs more digits than float32 has when |mean| >> std (an
    # ulp of 1e4 in float32 is 1e-3): keep these O(N*C) statistics in float64.
    shift64 = shift.double()
    rows = Moments(centred.count, centred.mean.double() + shift64, centred.m2.double())
    return Prepared(rows, xs, shift64)


def affine(x: Tensor, a: Tensor, centre: Tensor, b: Tensor) -> Tensor:
    """``y = a * (x - centre) + b`` with per-(n, c) (``(N, C)``) or per-channel (``(C,)``) coefficients.

    One pass; the output keeps ``x``'s memory format and dtype. The PyTorch fallback folds the centre
    into the shift (``a * x + (b - a * centre)``) and, for bfloat16/float16 input, computes in float32 and
    rounds once (coefficients rounded to 8 bits would add up to 2^-9 relative error).
    """
    if native.supports(x):
        return native.affine(x, a, centre, b)
    b = b - a * centre
    if _low_precision(x):
        y = torch.empty_like(x)
        return torch.addcmul(per_nc(b.float(), x), x, per_nc(a.float(), x), out=y)
    return torch.addcmul(per_nc(b.to(x.dtype), x), x, per_nc(a.to(x.dtype), x))


def _low_precision(x: Tensor) -> bool:
    return x.dtype not in (torch.float32, torch.float64)


def grad_sums(dy: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    """``S1 = sum_S dy`` and ``S2 = sum_S dy * (x - centre)``, each ``(N, C)`` in (at least) the accumulation dtype."""
    if native.supports(x) and spatial_dims(x):
        return native.grad_sums(dy, x, centre)
    acc = accumulation_dtype(x.dtype)
    dims = spatial_dims(x)
    if not dims:
        dy_acc = dy.to(acc)
        return dy_acc, dy_acc * (x.to(acc) - centre)
    s1 = dy.sum(dims, dtype=acc)
    n, c = x.shape[:2]
    if x.dtype == acc and x.is_contiguous() and dy.is_contiguous():
        # batched dot products: no full-size temporary
        s2 = torch.bmm(dy.view(n * c, 1, -1), x.view(n * c, -1, 1)).view(n, c)
    else:
        s2 = torch.mul(dy, x).sum(dims, dtype=acc)
    return s1, s2 - centre * s1


def affine_grad(dy: Tensor, x: Tensor, k1: Tensor, k2: Optional[Tensor], centre: Tensor, k3: Tensor) -> Tensor:
    """``dx = k1 * dy + k2 * (x - centre) + k3`` with per-(n, c) or per-channel coefficients (``k2`` may be None).

    The result keeps ``dy``'s memory format and ``x``'s dtype (float32 arithmetic for low-precision input
    in the PyTorch fallback, as in :func:`affine`).
    """
    if native.supports(x):
        return native.affine_grad(dy, x, k1, torch.zeros_like(k1) if k2 is None else k2, centre, k3)
    dt = torch.float32 if _low_precision(x) else x.dtype
    if k2 is not None:
        k3 = k3 - k2 * centre
    dx = torch.empty_like(dy, dtype=x.dtype)
    torch.addcmul(per_nc(k3.to(dt), x), dy, per_nc(k1.to(dt), x), out=dx)
    if k2 is not None:
        torch.addcmul(dx, x, per_nc(k2.to(dt), x), out=dx)
    return dx


__all__ = ["Prepared", "prepare", "affine", "grad_sums", "affine_grad", "per_nc", "spatial_dims"]
