"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li 2018): learned mixtures of IN, LN and BN statistics.

For ``x`` of shape ``(N, C, *S)`` with ``M = prod(S)`` positions, the instance moments are computed once
and the others merged from them (Chan's formula, :meth:`normzoo.stats.Moments.reduce`)::

    mu_IN[n,c], var_IN[n,c]     over S                      (one pass over x)
    mu_LN[n],   var_LN[n]       merge of the IN moments over c
    mu_BN[c],   var_BN[c]       merge of the IN moments over n   (eval: the running statistics)

    p = softmax(mean_logits),  q = softmax(var_logits)          (order: IN, LN, BN)
    mu  = p_IN mu_IN  + p_LN mu_LN  + p_BN mu_BN
    var = q_IN var_IN + q_LN var_LN + q_BN var_BN
    y   = gamma (x - mu) / sqrt(var + eps) + beta

Cost: one pass for the moments, one affine pass ``y = a_nc (x - mu_nc) + beta``; backward two reductions
and one pass, all mixing algebra on ``(N, C)`` tensors. Backward: with ``g = gamma dy``,
``d mu_nc = -rstd sum_S g``, ``d var_nc = -rstd^2 / 2 sum_S g x_hat``; the logits get the softmax gradient
``d logit_k = p_k sum (d mu) (mu_k - mu)`` (centred form: exact however large the means); the merged
statistics pass their gradient back to the instance moments (``d mu_IN += (p_LN d mu_LN + 2 (mu_IN - mu_LN)
q_LN d var_LN) / C``, ``d var_IN += q_LN d var_LN / C``, likewise for BN over n in training), and
``dx = a dy + d mu_IN / M + 2 d var_IN (x - mu_IN) / M``.

Where normzoo, the paper and the official code differ:

- **Variances** are the biased ones throughout, as the paper defines them. The official code takes the
  unbiased instance variance (``x.var(-1)``), which is NaN on ``N x C x 1 x 1`` input and mixes
  inconsistent estimators; here a single position gives ``var_IN = 0`` (eps inside the square root): no NaN.
- **Merges** use Chan's formula on centred moments, not ``E[x^2] - E[x]^2`` (the official code), so a
  channel with a large mean keeps its variance.
- **Running statistics** (BN part) follow ``torch.nn.BatchNorm``: buffers ``running_mean``/``running_var``
  of shape ``(C,)`` in the ``state_dict`` (a BatchNorm checkpoint loads with ``strict=False``, reporting
  only the mixing logits), torch's momentum convention, unbiased variance, ``momentum=None`` for the
  cumulative average. Eval uses them (the paper's default; with ``track_running_stats=False`` the batch
  statistics are used in eval too). The official code's other option, a *batch average* of the BN
  statistics collected after training, is ``momentum=None`` here, run over the data after
  ``reset_running_stats()`` (or normzoo's recalibration tools).
- **Mixing logits** are the parameters ``mean_logits``/``var_logits`` (3 each, initialised equal, as the
  official ``mean_weight``/``var_weight``); the properties :attr:`mean_weight` and :attr:`var_weight`
  return the softmax mixing weights.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from normzoo import _checks, kernels, native, native_mixtures, native_ops
from normzoo._autograd import lean_apply, once_differentiable
from normzoo.channel_norm import batch_or_running, native_batch_or_running
from normzoo.nn._base import NormBase
from normzoo.registry import register
from normzoo.running import update_running_stats

#: The order of the three statistics in the mixing logits.
SWITCH_ORDER = ("in", "ln", "bn")


class _SwitchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean_logits: Tensor,
                var_logits: Tensor, p: kernels.Prepared, bn_mean: Tensor, bn_var: Tensor, bn_count: Optional[int],
                eps: float) -> Tensor:
        """``bn_mean``/``bn_var``: ``(1, C)`` batch statistics (``bn_count`` elements, gradient flows) or
        running statistics (``bn_count=None``, constants)."""
        rows = p.rows
        acc = rows.mean.dtype
        n, c = rows.mean.shape
        ln = rows.reduce(1, keepdim=True)  # (N, 1)
        means = (rows.mean, ln.mean, bn_mean.to(acc))
        variances = (rows.m2 / rows.count, ln.var(0), bn_var.to(acc))
        pm = torch.softmax(mean_logits.to(acc), 0)
        pv = torch.softmax(var_logits.to(acc), 0)
        mean = pm[0] * means[0] + pm[1] * means[1] + pm[2] * means[2]  # (N, C)
        var = pv[0] * variances[0] + pv[1] * variances[1] + pv[2] * variances[2]
        rstd = torch.rsqrt(var + eps)
        gamma = weight.to(acc).unsqueeze(0) if weight is not None else None
        a = rstd if gamma is None else rstd * gamma
        b = torch.zeros_like(a) if bias is None else bias.to(acc).unsqueeze(0).expand_as(a)
        centre = mean if p.shift is None else mean - p.shift
        y = kernels.affine(p.x, a, centre, b)
        ctx.count_i, ctx.count_b, ctx.num_channels = rows.count, bn_count, c
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(p.x, weight, rstd, centre, mean, var, pm, pv, *means, *variances)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, rstd, centre, mean, var, pm, pv, mu_i, mu_l, mu_b, var_i, var_l, var_b = ctx.saved_tensors
        s1, t = kernels.grad_sums(dy, x, centre)  # t = sum_S dy (x - mu)
        a_sum = rstd * t  # sum_S dy x_hat
        dweight = a_sum.sum(0) if ctx.has_weight and ctx.needs_input_grad[1] else None
        dbias = s1.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        gamma = weight.to(rstd.dtype).unsqueeze(0) if weight is not None else None
        g1 = s1 if gamma is None else s1 * gamma
        g2 = a_sum if gamma is None else a_sum * gamma
        dmean = -rstd * g1  # (N, C): d loss / d mu_nc
        dvar = -0.5 * rstd * rstd * g2  # (N, C): d loss / d var_nc
        dmean_logits = dvar_logits = None
        if ctx.needs_input_grad[3]:  # softmax gradient in centred form: p_k sum dmu (mu_k - mu)
            dmean_logits = pm * torch.stack([(dmean * (m - mean)).sum() for m in (mu_i, mu_l, mu_b)])
        if ctx.needs_input_grad[4]:
            dvar_logits = pv * torch.stack([(dvar * (v - var)).sum() for v in (var_i, var_l, var_b)])
        dx = None
        if ctx.needs_input_grad[0]:
            c = ctx.num_channels
            dm_l, dv_l = dmean.sum(1, keepdim=True), dvar.sum(1, keepdim=True)  # (N, 1)
            dmu_i = pm[0] * dmean + (pm[1] * dm_l + 2.0 * (mu_i - mu_l) * pv[1] * dv_l) / c
            dvar_i = pv[0] * dvar + pv[1] * dv_l / c
            if ctx.count_b is not None:  # batch statistics: merged over the n samples
                nb = ctx.count_b // ctx.count_i
                dm_b, dv_b = dmean.sum(0, keepdim=True), dvar.sum(0, keepdim=True)  # (1, C)
                dmu_i = dmu_i + (pm[2] * dm_b + 2.0 * (mu_i - mu_b) * pv[2] * dv_b) / nb
                dvar_i = dvar_i + pv[2] * dv_b / nb
            k1 = rstd if gamma is None else rstd * gamma
            k2 = 2.0 * dvar_i / ctx.count_i  # multiplies x - mu_nc = (x - mu) + (mu - mu_nc)
            k3 = dmu_i / ctx.count_i + k2 * (mean - mu_i)
            dx = kernels.affine_grad(dy, x, k1, k2, centre, k3)
        return dx, dweight, dbias, dmean_logits, dvar_logits, None, None, None, None, None


class _SwitchNormNativeFn(torch.autograd.Function):
    """The same layer on the native kernels, one call each way (:func:`normzoo.native_mixtures.switch_forward`:
    the per-(n, c) moments, the mixing algebra with the running statistics updated, the affine pass; backward
    the two sums, the algebra, the ``dx`` pass). No O(N C) tensor operations in Python."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean_logits: Tensor,
                var_logits: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], use_batch: bool,
                training: bool, momentum: float, eps: float) -> Tensor:
        read = not use_batch or training  # running statistics: read in eval, updated in training
        y, keep = native_mixtures.switch_forward(x, mean_logits, var_logits, running_mean if read else None,
                                                 running_var if read else None, use_batch, momentum, weight, bias, eps)
        ctx.use_batch, ctx.param_dtypes = use_batch, native_mixtures.dtypes(weight, bias, mean_logits, var_logits)
        ctx.save_for_backward(x, weight, keep)  # keep: O(N C), counted as saved
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, keep = ctx.saved_tensors
        native.wake_workers(x)
        grads = native_mixtures.switch_backward(dy, x, keep, ctx.use_batch, weight, ctx.param_dtypes,
                                                ctx.needs_input_grad[:5])
        return (*grads, None, None, None, None, None, None)


_switch_apply = lean_apply(_SwitchNormNativeFn)


def _check_logits(name: str, what: str, t: object) -> Tensor:
    if not isinstance(t, Tensor) or t.shape != (3,):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: {what} must be a tensor of shape (3,) (logits for IN, LN, BN), got {got}")
    return t


def _switchable_norm(name: str, input: Tensor, mean_logits: Tensor, var_logits: Tensor,
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
                     bias: Optional[Tensor], training: bool, momentum: float, eps: float) -> Tensor:
    _checks.check_input(name, input, (2, 3, 4, 5), shape_hint="(N, C, *spatial)")
    _checks.check_eps(name, eps)
    c = input.shape[1]
    _check_logits(name, "mean_logits", mean_logits)
    _check_logits(name, "var_logits", var_logits)
    _checks.check_channel_params(name, c, weight=weight, bias=bias, running_mean=running_mean,
                                 running_var=running_var)
    use_batch = native_batch_or_running(name, input, running_mean, running_var, training)
    if use_batch is not None:
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            return compiled.switchable_norm(input, weight, bias, mean_logits, var_logits, running_mean, running_var,
                                            use_batch, training, momentum, eps, native.layout(input))
        return _switch_apply(input, weight, bias, mean_logits, var_logits, running_mean, running_var,
                             use_batch, training, momentum, eps)
    st = batch_or_running(name, input, running_mean, running_var, training)
    y = _SwitchNormFn.apply(input, weight, bias, mean_logits, var_logits, st.prepared, st.mean, st.var, st.count,
                            eps)
    batch = st.batch
    if training and (running_mean is not None or running_var is not None):
        update_running_stats(running_mean, running_var, batch.reshape(c), momentum)
    return y


def switchable_norm(input: Tensor, mean_logits: Tensor, var_logits: Tensor, running_mean: Optional[Tensor] = None,
                    running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                    eps: float = 1e-5) -> Tensor:
    """Switchable Normalization of ``input`` ``(N, C)`` or ``(N, C, *S)`` (see :mod:`normzoo.nn.switchable`).

    ``mean_logits``/``var_logits``: shape ``(3,)``, the mixing logits of the IN, LN and BN statistics.
    Training (or no running statistics): BN statistics from the batch, and the running statistics, if
    given, updated in place (torch's momentum convention, unbiased variance). Eval: BN part from the
    running statistics.
    """
    return _switchable_norm("switchable_norm", input, mean_logits, var_logits, running_mean, running_var, weight,
                            bias, training, momentum, eps)


class _SwitchNorm(NormBase):
    """Switchable Normalization (Luo et al. 2018): ``gamma (x - mu) / sqrt(var + eps) + beta`` with ``mu``,
    ``var`` softmax-weighted mixtures of the IN, LN and BN statistics (separate logits for mean and variance).

    BatchNorm's signature, parameters and buffers (the running statistics serve the BN part) plus the
    logits ``mean_logits``, ``var_logits`` (shape ``(3,)``, order IN, LN, BN, initialised equal).
    :attr:`mean_weight`/:attr:`var_weight` give the mixing weights. Eval: the BN part uses the running
    statistics. ``N x C x 1 x 1`` input is fine (IN variance 0). See :mod:`normzoo.nn.switchable`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.mean_logits = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_logits = nn.Parameter(torch.ones(3, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """BatchNorm's reset, and equal mixing logits."""
        super().reset_parameters()
        for name in ("mean_logits", "var_logits"):
            if name in self._parameters:
                nn.init.ones_(self._parameters[name])

    @property
    def mean_weight(self) -> Tensor:
        """``softmax(mean_logits)``: the weights of the IN, LN and BN means."""
        return torch.softmax(self.mean_logits, 0)

    @property
    def var_weight(self) -> Tensor:
        """``softmax(var_logits)``: the weights of the IN, LN and BN variances."""
        return torch.softmax(self.var_logits, 0)

    def forward(self, input: Tensor) -> Tensor:
        x = self._check_input(input)
        if self.training:
            self._check_batch_stats(x)
        weight, bias, running_mean, running_var, counter = self._state()
        factor = self._momentum_factor(counter)
        use_batch = self.training or not self.track_running_stats
        track = not self.training or self.track_running_stats
        return _switchable_norm(type(self).__name__, x, self.mean_logits, self.var_logits,
                                running_mean if track else None, running_var if track else None,
                                weight, bias, use_batch, factor, self.eps)


@register("switch1d", "switchnorm1d")
class SwitchNorm1d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__
    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


@register("switch2d", "switchnorm2d")
class SwitchNorm2d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


@register("switch3d", "switchnorm3d")
class SwitchNorm3d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "switchable_norm", "SWITCH_ORDER"]
