"""Batch-Instance Normalization (Nam & Kim 2018): a learned per-channel blend of BatchNorm and InstanceNorm.

For ``x`` of shape ``(N, C, *S)``::

    x_B = (x - mu_B) / sqrt(var_B + eps)        per channel over N and S (eval: running statistics)
    x_I = (x - mu_nc) / sqrt(var_nc + eps)      per sample and channel over S (train and eval)
    y   = gamma * (rho * x_B + (1 - rho) * x_I) + beta,      rho in [0, 1] per channel

``rho = 1`` is BatchNorm and ``rho = 0`` InstanceNorm (with affine), exactly. Both branches are one
affine map of ``x`` per (n, c), ``y = a_nc x + b_nc`` with ``a_nc = gamma (rho rstd_B + (1 - rho) rstd_nc)``,
so the layer costs what BatchNorm costs: per-(n, c) moments are read once (the BN moments are their
merge, :meth:`normzoo.stats.Moments.reduce`), one affine pass forward, and backward two reductions
``S1 = sum_S dy``, ``S2 = sum_S dy x`` plus one pass ``dx = k1 dy + k2 x + k3``. Each branch's gradient
is the standard one (``std_backward(h) = rstd (h - mean(h) - x_hat mean(h x_hat))`` with ``h = rho gamma dy``
over (N, S) for BN and ``h = (1 - rho) gamma dy`` over S for IN), and
``d rho = sum gamma dy (x_B - x_I)``.

**The gate.** The paper keeps ``rho`` in [0, 1] by clipping it after each parameter update, and raises
its learning rate (the official code: x10, no weight decay). The official code does the clipping in
its training script, so the layer used anywhere else drifts out of range. Here the layer keeps the
constraint itself, in two parts:

- in training mode the parameter is projected in place onto [0, 1] at the start of each forward. As
  ``rho`` is read only in the forward, this is the paper's clip-after-update (projected gradient
  descent), done lazily just before the value is used; the optimizer's state is the same.
- the forward also uses ``clamp(rho, 0, 1)``, so eval, the functional form and a checkpoint saved
  between an update and the next forward never use a value outside [0, 1]; its gradient is passed
  straight through the clamp (it is the gradient at the clipped value, as in the paper's update).

:func:`bin_param_groups` builds the optimizer parameter groups (gates with ``rho_lr_mult`` x the
learning rate and no weight decay). ``rho`` starts at 1 (BatchNorm), as in the official code, so a
BatchNorm checkpoint loads unchanged (``strict=False`` reports only ``rho`` missing); an official BIN
checkpoint's ``gate`` loads as ``rho``.

**Small inputs.** With a single spatial position the instance variance is 0 and ``x_I = 0`` (eps is
inside the square root): no NaN (the official code's ``F.batch_norm`` call refuses such input).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from normzoo import _checks, kernels, native, native_mixtures, native_ops
from normzoo._autograd import lean_apply, once_differentiable
from normzoo.channel_norm import batch_or_running, native_batch_or_running
from normzoo.nn._base import NormBase
from normzoo.registry import register
from normzoo.running import update_running_stats


def _row(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A per-channel ``(C,)`` tensor as ``(1, C)`` in ``dtype``."""
    return None if t is None else t.to(dtype).unsqueeze(0)


class _BatchInstanceNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], rho: Tensor,
                p: kernels.Prepared, bn_mean: Tensor, bn_var: Tensor, bn_count: Optional[int],
                eps: float) -> Tensor:
        """``bn_mean``/``bn_var``: ``(1, C)`` BN statistics (batch or running); ``bn_count`` the number of
        elements behind them when they are batch statistics (their gradient flows), None for constants."""
        rows = p.rows
        acc = rows.mean.dtype
        rstd_i = torch.rsqrt(rows.m2 / rows.count + eps)  # (N, C)
        rstd_b = torch.rsqrt(bn_var.to(acc) + eps)  # (1, C)
        centre = rows.mean if p.shift is None else rows.mean - p.shift  # instance mean in p.x's coordinates
        delta = centre - bn_mean.to(acc) if p.shift is None else centre - (bn_mean.to(acc) - p.shift)
        g = _row(rho, acc).clamp(0.0, 1.0)
        gamma = _row(weight, acc) if weight is not None else torch.ones_like(g)
        sb, si = gamma * g * rstd_b, gamma * (1.0 - g) * rstd_i  # per-branch scales
        # y = sb (x - mu_B) + si (x - mu_nc) + beta = (sb + si)(x - mu_nc) + sb (mu_nc - mu_B) + beta
        b = sb * delta
        if bias is not None:
            b = b + _row(bias, acc)
        y = kernels.affine(p.x, sb + si, centre, b)
        ctx.count_i, ctx.count_b = rows.count, bn_count
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(p.x, gamma, g, rstd_b, rstd_i, centre, delta)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, gamma, g, rstd_b, rstd_i, centre, delta = ctx.saved_tensors
        s1, t = kernels.grad_sums(dy, x, centre)  # t = sum_S dy (x - mu_nc)
        sum_i = rstd_i * t  # per (n, c): sum_S dy * x_I
        sum_b = rstd_b * (t + delta * s1)  # per (n, c): sum_S dy * x_B
        dweight = (g * sum_b + (1.0 - g) * sum_i).sum(0) if ctx.has_weight and ctx.needs_input_grad[1] else None
        dbias = s1.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        drho = (gamma * (sum_b - sum_i)).sum(0) if ctx.needs_input_grad[3] else None
        dx = None
        if ctx.needs_input_grad[0]:
            hb, hi = gamma * g, gamma * (1.0 - g)  # dy's weight in each branch
            k1 = hb * rstd_b + hi * rstd_i
            n_i = ctx.count_i
            k2 = -rstd_i * rstd_i * hi * sum_i / n_i  # IN branch, through mu_nc and var_nc
            k3 = -rstd_i * hi * s1 / n_i
            if ctx.count_b is not None:  # BN branch with batch statistics, through mu_B and var_B
                n_b = ctx.count_b
                k2b = -rstd_b * rstd_b * (hb * sum_b).sum(0, keepdim=True) / n_b  # multiplies x - mu_B
                k2 = k2 + k2b
                k3 = k3 - rstd_b * (hb * s1).sum(0, keepdim=True) / n_b + k2b * delta
            dx = kernels.affine_grad(dy, x, k1, k2, centre, k3)
        return dx, dweight, dbias, drho, None, None, None, None, None


class _BatchInstanceNormNativeFn(torch.autograd.Function):
    """The same layer on the native kernels, one call each way (:func:`normzoo.native_mixtures.bin_forward`: the
    instance moments, the blend algebra with the running statistics updated, the affine pass; backward the two
    sums, the algebra, the ``dx`` pass). No O(N C) tensor operations in Python."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], rho: Tensor,
                running_mean: Optional[Tensor], running_var: Optional[Tensor], use_batch: bool, training: bool,
                momentum: float, eps: float) -> Tensor:
        read = not use_batch or training  # running statistics: read in eval, updated in training
        y, keep = native_mixtures.bin_forward(x, rho, running_mean if read else None, running_var if read else None,
                                              use_batch, momentum, weight, bias, eps)
        ctx.use_batch, ctx.param_dtypes = use_batch, native_mixtures.dtypes(weight, bias, rho)
        ctx.save_for_backward(x, weight, keep)  # keep: O(N C), counted as saved
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, keep = ctx.saved_tensors
        native.wake_workers(x)
        grads = native_mixtures.bin_backward(dy, x, keep, ctx.use_batch, weight, ctx.param_dtypes,
                                             ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None, None)


_bin_apply = lean_apply(_BatchInstanceNormNativeFn)


def _batch_instance_norm(name: str, input: Tensor, rho: Tensor, running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                         training: bool, momentum: float, eps: float) -> Tensor:
    _checks.check_input(name, input, (3, 4, 5), shape_hint="(N, C, *spatial)")
    _checks.check_eps(name, eps)
    c = input.shape[1]
    if not isinstance(rho, Tensor):
        raise TypeError(f"{name}: rho must be a tensor of shape ({c},), got {type(rho).__name__}")
    _checks.check_param(name, "rho", rho, (c,))
    _checks.check_channel_params(name, c, weight=weight, bias=bias, running_mean=running_mean,
                                 running_var=running_var)
    use_batch = native_batch_or_running(name, input, running_mean, running_var, training)
    if use_batch is not None:
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            return compiled.batch_instance_norm(input, weight, bias, rho, running_mean, running_var, use_batch,
                                                training, momentum, eps, native.layout(input))
        return _bin_apply(input, weight, bias, rho, running_mean, running_var, use_batch,
                          training, momentum, eps)
    st = batch_or_running(name, input, running_mean, running_var, training)
    y = _BatchInstanceNormFn.apply(input, weight, bias, rho, st.prepared, st.mean, st.var, st.count, eps)
    batch = st.batch
    if training and (running_mean is not None or running_var is not None):
        update_running_stats(running_mean, running_var, batch.reshape(c), momentum)
    return y


def batch_instance_norm(input: Tensor, rho: Tensor, running_mean: Optional[Tensor] = None,
                        running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5) -> Tensor:
    """Batch-Instance Normalization of ``input`` ``(N, C, *S)`` (see :mod:`normzoo.nn.batch_instance`).

    ``y = gamma (rho x_B + (1 - rho) x_I) + beta`` with the gate ``rho`` of shape ``(C,)``, used as
    ``clamp(rho, 0, 1)`` (gradient passed straight through the clamp). Training (or no running
    statistics): ``x_B`` from the batch statistics, and the running statistics, if given, updated in place
    as BatchNorm's (torch's momentum convention, unbiased variance). Eval: ``x_B`` from the running
    statistics; ``x_I`` always from the instance statistics.
    """
    return _batch_instance_norm("batch_instance_norm", input, rho, running_mean, running_var, weight, bias, training,
                                momentum, eps)


class _BatchInstanceNorm(NormBase):
    """Batch-Instance Normalization (Nam & Kim 2018): ``y = gamma (rho x_BN + (1 - rho) x_IN) + beta``.

    BatchNorm's signature, parameters and buffers (the running statistics serve the BN branch) plus the
    gate ``rho`` of shape ``(C,)``, initialised to 1 (BatchNorm) and kept in [0, 1] by the layer (projected
    in place at each training forward, clamped in the forward; see :mod:`normzoo.nn.batch_instance`).
    Give it a larger learning rate with :func:`bin_param_groups`, as the paper does. Eval: the BN branch
    uses the running statistics, the IN branch the instance statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.rho = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """BatchNorm's reset, and ``rho`` to 1."""
        super().reset_parameters()
        if "rho" in self._parameters:
            nn.init.ones_(self.rho)

    @torch.no_grad()
    def project_rho(self) -> None:
        """Clip ``rho`` in place onto [0, 1] (done automatically at each training forward)."""
        self.rho.clamp_(0.0, 1.0)

    def forward(self, input: Tensor) -> Tensor:
        x = self._check_input(input)
        if self.training:
            self._check_batch_stats(x)
            self.project_rho()
        weight, bias, running_mean, running_var, counter = self._state()
        factor = self._momentum_factor(counter)
        use_batch = self.training or not self.track_running_stats
        track = not self.training or self.track_running_stats
        return _batch_instance_norm(type(self).__name__, x, self.rho, running_mean if track else None,
                                    running_var if track else None, weight, bias, use_batch, factor, self.eps)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "gate" in state_dict and prefix + "rho" not in state_dict:  # the official code's name
            state_dict[prefix + "rho"] = state_dict.pop(prefix + "gate")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


@register("bin1d", "batchinstancenorm1d")
class BatchInstanceNorm1d(_BatchInstanceNorm):
    __doc__ = _BatchInstanceNorm.__doc__
    _input_dims = (3,)
    _shape_hint = "(N, C, L)"


@register("bin2d", "batchinstancenorm2d", "bin")
class BatchInstanceNorm2d(_BatchInstanceNorm):
    __doc__ = _BatchInstanceNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


def bin_param_groups(model: nn.Module, lr: float, rho_lr_mult: float = 10.0,
                     rho_weight_decay: Optional[float] = 0.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups giving every Batch-Instance Norm gate its own learning rate.

    Returns ``[{"params": others}, {"params": gates, "lr": lr * rho_lr_mult, "weight_decay": ...}]`` (the
    second group only when ``model`` has gates), the paper's recipe with the official code's defaults
    (x10, no weight decay on the gates; ``rho_weight_decay=None`` keeps the optimizer's default). Pass
    ``lr`` as the optimizer's learning rate as well:

    >>> opt = torch.optim.SGD(bin_param_groups(model, lr=0.1), lr=0.1, momentum=0.9, weight_decay=1e-4)

    LR schedulers that scale every group keep the ratio.
    """
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ValueError(f"bin_param_groups: lr must be a non-negative number, got {lr!r}")
    if not isinstance(rho_lr_mult, (int, float)) or isinstance(rho_lr_mult, bool) or rho_lr_mult < 0:
        raise ValueError(f"bin_param_groups: rho_lr_mult must be a non-negative number, got {rho_lr_mult!r}")
    gates = [m.rho for m in model.modules() if isinstance(m, _BatchInstanceNorm)]
    gate_ids = {id(p) for p in gates}
    others = [p for p in model.parameters() if id(p) not in gate_ids]
    groups: List[Dict[str, Any]] = [{"params": others}]
    if gates:
        group: Dict[str, Any] = {"params": gates, "lr": lr * rho_lr_mult}
        if rho_weight_decay is not None:
            group["weight_decay"] = rho_weight_decay
        groups.append(group)
    return groups


__all__ = ["BatchInstanceNorm1d", "BatchInstanceNorm2d", "batch_instance_norm", "bin_param_groups"]
