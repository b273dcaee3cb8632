"""LayerNorm and RMSNorm over the last dims as one fused autograd op on rows ``(R, D)``.

With ``x_hat = (x - centre) * rstd`` per row (``centre = mean``, ``rstd = 1/sqrt(var + eps)`` for LayerNorm;
``centre = 0``, ``rstd = 1/sqrt(mean(x^2) + eps)`` for RMSNorm) and ``g = dy * gamma``:

    y  = gamma * x_hat + beta
    dx = rstd * (g - mean_d(g) - x_hat * mean_d(g * x_hat))       (RMSNorm: without mean_d(g))
    dgamma = sum_rows dy * x_hat,   dbeta = sum_rows dy

The native kernels (:mod:`normzoo.native`) read each row once forward (statistics and output while the
row is in cache) and once backward (row sums, ``dx`` and the column sums of ``dgamma``/``dbeta``), which
is the memory-traffic floor. Saved for backward: ``x`` and two float64 numbers per row. Where the native
kernels do not apply, :func:`normzoo.functional.layer_norm` uses the channel-norm engine instead.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from normzoo import native


class _RowNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                rms: bool) -> Tensor:
        y, centre, rstd = native.rownorm_forward(x, weight, bias, eps, rms)
        ctx.rms = rms
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, centre, rstd)
        return y

    @staticmethod
    @once_differentiable  # the row statistics are saved as constants: no silent wrong second derivative
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, centre, rstd = ctx.saved_tensors
        native.wake_workers(x)
        want_w, want_b = ctx.has_weight and ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        dx, dgamma, dbeta = native.rownorm_backward(dy, x, weight, centre, rstd, ctx.rms, want_w, want_b)
        dw = dgamma.to(weight.dtype) if want_w else None
        db = dbeta.to(ctx.bias_dtype) if want_b else None
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None, None


def applies(rows: Tensor) -> bool:
    """Whether the fused native row kernels can take these ``(R, D)`` rows."""
    return rows.dim() == 2 and rows.is_contiguous() and native.supports(rows)


def row_norm(rows: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool) -> Tensor:
    """``(R, D)`` contiguous rows normalized over ``D`` with a per-column affine (``weight``/``bias`` of size D)."""
    native.wake_workers(rows)
    return _RowNormFn.apply(rows, weight, bias, eps, rms)


__all__ = ["row_norm", "applies"]
