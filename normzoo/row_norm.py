"""LayerNorm and RMSNorm over the last dims as one fused autograd op on rows ``(R, D)``.

With ``x_hat = (x - centre) * rstd`` per row (``centre = mean``, ``rstd = 1/sqrt(var + eps)`` for LayerNorm;
``centre = 0``, ``rstd = 1/sqrt(mean(x^2) + eps)`` for RMSNorm) and ``g = dy * gamma``:

    y  = gamma * x_hat + beta
    dx = rstd * (g - mean_d(g) - x_hat * mean_d(g * x_hat))       (RMSNorm: without mean_d(g))
    dgamma = sum_rows dy * x_hat,   dbeta = sum_rows dy

The native kernels (:mod:`normzoo.native`) read each row once forward (statistics and output while the
row is in cache) and once backward (row sums, ``dx`` and the column sums of ``dgamma``/``dbeta``), which
is the memory-traffic floor. Saved for backward: ``x`` and two float64 numbers per row (one block). Where the native
kernels do not apply, :func:`normzoo.functional.layer_norm` uses the channel-norm engine instead.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from normzoo import native, native_ops
from normzoo._autograd import lean_apply, once_differentiable


class _RowNormFn(torch.autograd.Function):
    """One op on the input as it is (any shape whose trailing dims hold the ``D`` normalized values, contiguous):
    the kernels read it as rows of ``D`` values, so no reshape of the input, the output or the parameters adds
    a node to the graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], d: int, eps: float,
                rms: bool) -> Tensor:
        y, stats = native.rownorm_forward(x, weight, bias, eps, rms, d)
        ctx.rms, ctx.d = rms, d
        ctx.bias_shape = (bias.dtype, bias.shape) if bias is not None else None
        ctx.save_for_backward(x, weight, stats)
        return y

    @staticmethod
    @once_differentiable  # the row statistics are saved as constants: no silent wrong second derivative
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, stats = ctx.saved_tensors
        native.wake_workers(x)
        d = ctx.d
        _, want_w, want_b, *_ = ctx.needs_input_grad
        want_w, want_b = want_w and weight is not None, want_b and ctx.bias_shape is not None
        dx, dgamma, dbeta = native.rownorm_backward(dy, x, weight, stats, ctx.rms, want_w, want_b, d,
                                                    ctx.bias_shape[0] if ctx.bias_shape else None)
        dw = _as_param(dgamma, weight.dtype, weight.shape) if want_w else None
        db = _as_param(dbeta, *ctx.bias_shape) if want_b else None
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None, None, None


def _as_param(grad: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    """A column-sum gradient ``(D,)`` as its parameter's dtype and shape (no call where it already is: the
    kernels write float32, float64 and bfloat16 gradients in their parameter's type)."""
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    return grad if grad.shape == shape else grad.view(shape)


_row_apply = lean_apply(_RowNormFn)


def applies(x: Tensor, d: int) -> bool:
    """Whether the fused native row kernels can take ``x`` as rows of ``d`` values (contiguous, d > 0)."""
    lay = native.supported_layout(x)  # contiguous: 0, or 1 for 2-D (channels_last tensors are 1 too)
    return d > 0 and lay is not None and (lay == 0 or x.dim() == 2)


def row_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], d: int, eps: float, rms: bool) -> Tensor:
    """``x`` (contiguous, its trailing dims holding ``d`` values per row) normalized over each row with a
    per-column affine (``weight``/``bias`` of ``d`` values, any shape); the result has ``x``'s shape."""
    native.wake_workers(x)
    compiled = native_ops.ops()
    if compiled is not None:  # the same op with its autograd in C++
        return compiled.row_norm(x, weight, bias, d, eps, rms)
    return _row_apply(x, weight, bias, d, eps, rms)


__all__ = ["row_norm", "applies"]
