"""Normalization of ``(N, C, *S)`` input with batch, instance or group statistics, in one autograd op.

This is the engine behind BatchNorm (statistics per channel over the batch and space), mean-only
BatchNorm, InstanceNorm (per sample and channel), GroupNorm (per sample and channel group) and the
channel-first LayerNorm (GroupNorm with one group). With ``g`` a statistics group, ``c`` a channel:

    mode "standard":  x_hat = (x - mu_g) / sqrt(var_g + eps)
    mode "mean":      x_hat = x - mu_g                         (mean-only BatchNorm)
    mode "rms":       x_hat = x / sqrt(mean_g(x^2) + eps)       (RMSNorm: no centring)
    y = gamma_c * x_hat + beta_c

Forward: per-(n, c) moments (:func:`normzoo.kernels.prepare`) merged into group moments
(:meth:`normzoo.stats.Moments.reduce`), then one affine pass ``y = a * x + b``.

Backward (derived once for all policies; ``M_g`` elements per group, sums over the group):

    dbeta_c  = sum dy,    dgamma_c = sum dy * x_hat
    dx = rstd_g * (gamma_c dy - (1/M_g) sum gamma dy - x_hat (1/M_g) sum gamma dy x_hat)

(mode "mean": rstd = 1 and no x_hat term; mode "rms": no mean term.)

computed from the per-(n, c) sums ``S1 = sum_S dy``, ``S2 = sum_S dy (x - centre)`` and one pass
``dx = k1 dy + k2 (x - centre) + k3`` (:mod:`normzoo.kernels`).

Saved for backward: ``x`` (or its centred copy) and ``O(N C)`` statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from normzoo import _checks, kernels, native, native_ops
from normzoo._autograd import grad_as, lean_apply, once_differentiable
from normzoo.running import Running
from normzoo.stats import Moments, ill_conditioned


@dataclass(frozen=True)
class Policy:
    """Which per-(n, c) rows form one statistics group.

    ``over``: ``"batch"`` (group = channel, over N and space), ``"instance"`` (group = (n, c)),
    ``"group"`` (group = (n, channel group), ``groups`` groups of consecutive channels).
    """

    over: str
    groups: int = 1

    def group_count(self, x: Tensor) -> int:
        """Elements per statistics group for input ``x`` of shape ``(N, C, *S)``."""
        per_row = x.numel() // (x.shape[0] * x.shape[1])
        if self.over == "batch":
            return per_row * x.shape[0]
        if self.over == "group":
            return per_row * (x.shape[1] // self.groups)
        return per_row

    def reduce(self, rows: Moments) -> Moments:
        """Group moments from per-(n, c) moments; shapes ``(1, C)``, ``(N, C)`` or ``(N, G)``."""
        if self.over == "batch":
            return rows.reduce(0, keepdim=True)
        if self.over == "instance":
            return rows
        n, c = rows.mean.shape
        return rows.reshape(n, self.groups, c // self.groups).reduce(2)

    def group_sum(self, t: Tensor) -> Tensor:
        """Sum a per-(n, c) tensor within each statistics group (same shapes as :meth:`reduce`)."""
        if self.over == "batch":
            return t.sum(0, keepdim=True)
        if self.over == "instance":
            return t
        n, c = t.shape
        return t.view(n, self.groups, c // self.groups).sum(2)

    def expand(self, t: Tensor, num_channels: int) -> Tensor:
        """Per-group tensor -> broadcastable to ``(N, C)``."""
        if self.over == "group":
            n = t.shape[0]
            return t.unsqueeze(2).expand(n, self.groups, num_channels // self.groups).reshape(n, num_channels)
        return t


def _group_scale(group: Moments, eps: float, mode: str) -> Tensor:
    """Per-group ``rstd``: ``1/sqrt(var + eps)``, ``1`` (mean-only) or ``1/sqrt(mean(x^2) + eps)`` (RMS)."""
    if mode == "mean":
        return torch.ones_like(group.mean)
    second = group.var(0) + group.mean.square() if mode == "rms" else group.var(0)
    return torch.rsqrt(second + eps)


def _centre(group_mean: Tensor, shift: Optional[Tensor], policy: Policy, num_channels: int, mode: str) -> Tensor:
    """Per-(n, c) ``mu - shift`` (``-shift`` in RMS mode): ``x_hat = (x_work - centre) * rstd``."""
    mean = torch.zeros_like(group_mean) if mode == "rms" else group_mean
    centre = policy.expand(mean, num_channels)
    return centre if shift is None else centre - shift


def _with_weight(t: Tensor, weight: Optional[Tensor]) -> Tensor:
    return t if weight is None else t * weight.to(t.dtype)


def fused_backward(ctx: Any, kernel: Callable[..., Tuple]) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The backward of a fused native op that saved ``x``, ``weight`` and its statistics block (and set
    ``ctx.bias_dtype``): ``kernel(x, weight, stats, dgamma, dbeta)`` gives ``dx`` and the parameter gradients
    asked for, which come back in the parameters' dtypes."""
    x, weight, stats = ctx.saved_tensors
    native.wake_workers(x)
    _, want_w, want_b, *_ = ctx.needs_input_grad
    dx, dweight, dbias = kernel(x, weight, stats, want_w and weight is not None, want_b and ctx.bias_dtype is not None)
    return dx, grad_as(dweight, weight), grad_as(dbias, ctx.bias_dtype)


class _GroupFn(torch.autograd.Function):
    """Statistics local to a sample (InstanceNorm, GroupNorm, channel-first LayerNorm) in the native fused
    kernels, :func:`normzoo.native.group_forward` and ``group_backward``: each block of ``x`` is read once
    per pass, and the parameter gradients come out of the backward kernel. Kept lean on purpose (one call
    each way, nothing else): at small sizes the Python cost of an op is a visible part of a layer's time.
    ``lay``: ``x``'s layout, as :func:`normzoo.native.supported_layout` gave it. ``out`` receives the statistics
    block (float64 ``(3, N, G)``: mean, M2, rstd), constants for autograd."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, eps: float,
                mode: str, lay: int, out: list) -> Tensor:
        y, stats = native.group_forward(x, groups, weight, bias, eps, mode, lay=lay)
        ctx.groups, ctx.mode, ctx.lay, ctx.bias_dtype = groups, mode, lay, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, stats)
        out.append(stats)
        return y

    @staticmethod
    @once_differentiable  # statistics are saved as constants: a second derivative must fail, not be wrong
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        def kernel(x: Tensor, weight: Optional[Tensor], stats: Tensor, dgamma: bool, dbeta: bool) -> Tuple:
            return native.group_backward(dy, x, ctx.groups, weight, stats, ctx.mode, dgamma, dbeta,
                                         bias_dtype=ctx.bias_dtype, lay=ctx.lay)[:3]

        return (*fused_backward(ctx, kernel), None, None, None, None, None)


class _BatchFn(torch.autograd.Function):
    """BatchNorm training (statistics per channel over the batch and space) in the native kernels,
    :func:`normzoo.native.batch_forward` and ``batch_backward``: both passes, the per-channel algebra and the
    running-statistics update (where :func:`normzoo.native.running_update_applies`) in one call each way.
    ``extra``: constant moments merged into every channel (Cross-Iteration BN's window, scalar count); the
    backward then runs with the merged count. ``out`` receives the forward's statistics block (float64
    ``(3, C)``: mean, M2, rstd; with ``extra`` ``(5, C)``, the merged ones, then the batch's own mean and M2)
    and whether the running statistics were updated. ``lay`` as in :class:`_GroupFn`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mode: str,
                extra: Optional[Moments], running: Optional[Running], lay: int, out: list) -> Tensor:
        in_c = running is not None and native.running_update_applies(running.mean, running.var)
        run = (running.mean, running.var, running.momentum) if in_c else ()
        merged_count = None
        if extra is None:
            y, stats = native.batch_forward(x, weight, bias, eps, mode, *run, lay=lay)
        else:  # the backward runs with the merged count
            extra_count = float(extra.count)
            y, stats = native.batch_merged_forward(x, weight, bias, eps, mode, extra_count, extra.mean, extra.m2, *run,
                                                   lay=lay)
            merged_count = x.numel() // x.shape[1] + extra_count
        ctx.mode, ctx.merged_count, ctx.lay, ctx.bias_dtype = mode, merged_count, lay, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, stats)
        out += (stats, in_c)
        return y

    @staticmethod
    @once_differentiable  # statistics are saved as constants: a second derivative must fail, not be wrong
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        def kernel(x: Tensor, weight: Optional[Tensor], stats: Tensor, dgamma: bool, dbeta: bool) -> Tuple:
            return native.batch_backward(dy, x, weight, stats, ctx.mode, dgamma, dbeta, ctx.merged_count,
                                         ctx.bias_dtype, lay=ctx.lay)

        return (*fused_backward(ctx, kernel), None, None, None, None, None, None)


class _FixedBatchFn(torch.autograd.Function):
    """BatchNorm with fixed statistics (eval mode) in the native kernels, :func:`normzoo.native.batch_fixed_forward`
    and ``batch_backward(fixed=True)``: one pass each way, ``dx = gamma rstd dy``. The layer is affine in ``x`` with
    constant statistics, so unlike the training ops it is differentiable again: under ``create_graph`` the backward
    is taken with tensor operations. ``x`` is kept only where a parameter requires grad (a frozen BatchNorm keeps
    no activation). ``mode``: ``"standard"`` or ``"mean"``; ``lay`` as in :class:`_GroupFn`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                var: Optional[Tensor], eps: float, mode: str, lay: int) -> Tensor:
        y, stats = native.batch_fixed_forward(x, weight, bias, mean, var, eps, mode, lay=lay)
        ctx.mode, ctx.lay, ctx.bias_dtype = mode, lay, None if bias is None else bias.dtype
        ctx.keep_x = any(p is not None and p.requires_grad for p in (weight, bias))
        ctx.save_for_backward(x if ctx.keep_x else None, weight, stats)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            dx, dweight, dbias = _fixed_grads_differentiable(ctx, dy)
        elif not ctx.keep_x:  # no parameter needs a gradient: dx from dy alone (x's dtype and shape)
            dy = native._like(dy, dy, ctx.lay)
            _, weight, stats = ctx.saved_tensors
            dx, dweight, dbias = native.batch_backward(dy, dy, weight, stats, ctx.mode, False, False, lay=ctx.lay,
                                                       fixed=True)
        else:
            def kernel(x: Tensor, weight: Optional[Tensor], stats: Tensor, dgamma: bool, dbeta: bool) -> Tuple:
                return native.batch_backward(dy, x, weight, stats, ctx.mode, dgamma, dbeta, bias_dtype=ctx.bias_dtype,
                                             lay=ctx.lay, fixed=True)

            dx, dweight, dbias = fused_backward(ctx, kernel)
        return dx, dweight, dbias, None, None, None, None, None


def _fixed_grads_differentiable(ctx: Any, dy: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """:class:`_FixedBatchFn`'s gradients from tensor operations in ``x``'s arithmetic type (float64 for float64,
    else float32), recorded by autograd: ``dx = gamma rstd dy``, ``dgamma = sum dy (x - mean) rstd``, ``dbeta = sum
    dy``."""
    x, weight, stats = ctx.saved_tensors  # (x: None where no parameter requires grad; dy has its dtype and shape)
    _, want_w, want_b, *_ = ctx.needs_input_grad
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    shape, dims = (1, -1) + (1,) * (dy.dim() - 2), [0] + list(range(2, dy.dim()))
    rstd, g = stats[1].to(acc).view(shape), dy.to(acc)
    dx = (g * rstd if weight is None else g * (weight.to(acc).view(shape) * rstd)).to(dy.dtype)
    dweight = dbias = None
    if want_w and weight is not None:
        dweight = (g * (x.to(acc) - stats[0].to(acc).view(shape)) * rstd).sum(dims)
    if want_b and ctx.bias_dtype is not None:
        dbias = g.sum(dims)
    return dx, grad_as(dweight, weight), grad_as(dbias, ctx.bias_dtype)


class _ChannelNormFn(torch.autograd.Function):
    """The general autograd op behind :func:`channel_norm` (what the fused native ops, :class:`_BatchFn` and
    :class:`_GroupFn`, do not take: prepared moments, a per-group merged count, RMS over the batch, 2-D input
    for sample-local statistics, or no native kernels). Its one output is ``y``: the group moments, constants
    for autograd, go to the caller through ``out`` (a list that receives ``mean, m2, running_done`` and the
    group's own moments before ``extra`` was merged in, ``own_mean, own_m2``), which keeps the op as light
    as torch's own norms in the autograd engine (no outputs to wrap, no zero gradients to make for them)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], policy: Policy,
                eps: float, mode: str, prepared: Optional[kernels.Prepared], extra: Optional[Moments],
                running: Optional[Running], out: list) -> Tensor:
        c = x.shape[1]
        ctx.policy, ctx.mode = policy, mode
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        p = prepared if prepared is not None else kernels.prepare(x)
        group = policy.reduce(p.rows)
        if x.dim() == 2 and not p.exact and p.shift is None and bool(ill_conditioned(group, x.dtype).any()):
            # one element per row: only the group shows that the data sits far from 0; centre on it
            p = kernels.prepare(x, shift=policy.expand(group.mean, x.shape[1]))
            group = policy.reduce(p.rows)
        own = group
        if extra is not None:  # constant moments merged in: the backward below holds with the merged count
            group = group.merge(extra)
        rstd_g = _group_scale(group, eps, mode)
        a = _with_weight(policy.expand(rstd_g, c), weight)
        centre = _centre(group.mean, p.shift, policy, c, mode)
        b = torch.zeros_like(a) if bias is None else bias.to(a.dtype).expand_as(a)
        y = kernels.affine(p.x, a, centre, b)
        ctx.count = group.count
        # saved: the tensor the forward read, and per-group statistics (per-(n, c) only for a shift)
        ctx.save_for_backward(p.x, weight, group.mean, rstd_g, p.shift)
        out += [group.mean, group.m2, False, own.mean, own.m2]
        return y

    @staticmethod
    @once_differentiable  # statistics are saved as constants: a second derivative must fail, not be wrong
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, mean_g, rstd_g, shift = ctx.saved_tensors
        native.wake_workers(x)
        want_w, want_b = ctx.has_weight and ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        policy: Policy = ctx.policy
        c = x.shape[1]
        rstd = policy.expand(rstd_g, c)
        centre = _centre(mean_g, shift, policy, c, ctx.mode)  # x_hat = (x - centre) * rstd
        s1, s2 = kernels.grad_sums(dy, x, centre)
        a_sum = rstd * s2  # per (n, c): sum_S dy * x_hat
        dweight = a_sum.sum(0) if want_w else None
        dbias = s1.sum(0) if want_b else None
        dx = None
        if ctx.needs_input_grad[0]:
            count = ctx.count
            k1 = _with_weight(rstd, weight)
            k3 = torch.zeros_like(rstd)
            if ctx.mode != "rms":  # the gradient through the mean
                k3 = k3 - rstd * policy.expand(policy.group_sum(_with_weight(s1, weight)), c) / count
            k2 = None
            if ctx.mode != "mean":  # the gradient through the variance (or mean square)
                c_g = policy.expand(policy.group_sum(_with_weight(a_sum, weight)), c) / count
                k2 = -rstd * rstd * c_g
            dx = kernels.affine_grad(dy, x, k1, k2, centre, k3)
        return dx, dweight, dbias, None, None, None, None, None, None, None


_group_apply, _batch_apply, _fixed_apply = lean_apply(_GroupFn), lean_apply(_BatchFn), lean_apply(_FixedBatchFn)


def _running_args(running: Optional[Running]) -> Tuple[Optional[Tensor], Optional[Tensor], float]:
    """``running_mean, running_var, momentum`` as the compiled BatchNorm operators take them (``None, None, 0.0``:
    none to update)."""
    return (running.mean, running.var, running.momentum) if running is not None else (None, None, 0.0)


def channel_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    policy: Policy,
    eps: float = 1e-5,
    mode: str = "standard",
    prepared: Optional[kernels.Prepared] = None,
    extra: Optional[Moments] = None,
    running: Optional[Running] = None,
    own: Optional[list] = None,
    moments: bool = True,
) -> Tuple[Tensor, Optional[Moments]]:
    """Normalize ``x`` of shape ``(N, C, *S)`` with statistics of the given :class:`Policy`.

    ``mode``: ``"standard"``, ``"mean"`` (mean-only) or ``"rms"`` (see the module doc).
    Returns ``(y, group_moments)``; the moments (float64, detached) serve running-statistics updates.
    ``weight``/``bias`` (shape ``(C,)``) may be any autograd expressions (Batch Renorm passes
    ``gamma * r`` and ``beta + gamma * d``). ``prepared`` lets a caller that needed the statistics
    first (to compute its own coefficients) hand over :func:`normzoo.kernels.prepare`'s result
    instead of reading ``x`` again. ``extra``: moments of further data, treated as constants, merged
    into every group before normalizing (Cross-Iteration BN's past iterations; shape ``(1, C)`` for the
    batch policy). The gradient flows through ``x``'s own moments only: with ``M`` the merged count,
    ``d mu / dx = 1 / M`` and ``d var / dx = 2 (x - mu) / M``, so the backward above holds with
    ``M_g = M``. The returned moments are then the merged ones.
    ``running``: running statistics to update with the group moments of ``x`` itself, before ``extra`` is
    merged in (batch policy: per channel; instance policy: averaged over the batch, see
    :func:`normzoo.running.update_running_stats`); BatchNorm's native kernel does it in the same call.
    ``own``: a list that receives those moments of ``x`` itself (a :class:`Moments`).
    ``moments=False``: return ``(y, None)``, for callers that only want ``y`` (the moments are then not even
    assembled; the layers' hot path).
    """
    native.wake_workers(x)
    if mode not in ("standard", "mean", "rms"):
        raise ValueError(f"channel_norm: mode must be 'standard', 'mean' or 'rms', got {mode!r}")
    out: list = []
    scalar_extra = extra is None or not isinstance(extra.count, Tensor) or extra.count.numel() == 1
    wanted = moments or running is not None or own is not None
    lay = native.supported_layout(x)
    if prepared is None and policy.over == "batch" and mode != "rms" and scalar_extra and lay is not None:
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++; it updates the running statistics
            window = (float(extra.count), extra.mean, extra.m2) if extra is not None else (0.0, None, None)
            y, stats = compiled.batch_norm_stats(x, weight, bias, *_running_args(running), eps, native._MODES[mode],
                                                 lay, False, 0.0, 0.0, *window)
            running_done = running is not None
        else:
            y = _batch_apply(x, weight, bias, eps, mode, extra, running, lay, out)
            stats, running_done = out
        if not (moments or own is not None or (running is not None and not running_done)):
            return y, None
        stats = stats.unsqueeze(1)  # rows of (1, C)
        mean, m2 = stats[0], stats[1]
        own_mean, own_m2 = (mean, m2) if extra is None else (stats[3], stats[4])
    elif prepared is None and extra is None and policy.over != "batch" and x.dim() > 2 and lay is not None:
        # statistics local to a sample: one fused pass reads each block once
        groups = x.shape[1] if policy.over == "instance" else policy.groups
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            y, stats = compiled.group_norm_stats(x, weight, bias, groups, eps, native._MODES[mode], lay)
        else:
            y = _group_apply(x, weight, bias, groups, eps, mode, lay, out)
            stats = out[0]
        if not wanted:
            return y, None
        mean = own_mean = stats[0]
        m2 = own_m2 = stats[1]
        running_done = False
    else:
        y = _ChannelNormFn.apply(x, weight, bias, policy, eps, mode, prepared, extra, running, out)
        mean, m2, running_done, own_mean, own_m2 = out
    count = policy.group_count(x)
    result = Moments(count if extra is None else count + extra.count, mean, m2)
    if running is not None or own is not None:
        mine = result if extra is None else Moments(count, own_mean, own_m2)
        if own is not None:
            own.append(mine)
        if running is not None and not running_done:
            running.update(mine.reshape(x.shape[1]) if policy.over == "batch" else mine)
    return y, (result if moments else None)


def batch_stats_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mode: str,
                     running: Optional[Running]) -> Tensor:
    """``y`` normalized with the batch's statistics per channel (BatchNorm training: ``mode="standard"``; mean-only
    BatchNorm: ``"mean"``), ``running`` updated with them. The layers' hot path, as :func:`sample_norm`: straight
    to the fused native op (which also updates float32, float64 or bfloat16 running buffers), otherwise
    :func:`channel_norm`. The caller has checked the arguments."""
    lay = native.supported_layout(x)
    if lay is not None:
        native.wake_workers(x)
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++ (it also updates the running statistics)
            return compiled.batch_norm(x, weight, bias, *_running_args(running), eps, native._MODES[mode], lay)
        out: list = []
        y = _batch_apply(x, weight, bias, eps, mode, None, running, lay, out)
        stats, running_done = out
        if running is not None and not running_done:
            running.update(Moments(x.numel() // x.shape[1], stats[0], stats[1]))
        return y
    return channel_norm(x, weight, bias, Policy("batch"), eps, mode=mode, running=running, moments=False)[0]


def sample_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, eps: float,
                mode: str = "standard") -> Tensor:
    """``y`` for statistics local to a sample: per sample over each of ``groups`` groups of consecutive channels
    and the spatial dims (GroupNorm; ``groups = 1`` the channel-first LayerNorm, ``groups = C`` InstanceNorm).

    The layers' hot path: straight to the fused native op where it takes ``x`` (``(N, C, *S)``), since at small
    sizes every Python call before the kernel shows in a step's time; otherwise :func:`channel_norm`. The
    caller has checked the arguments.
    """
    lay = native.supported_layout(x) if x.dim() > 2 else None
    if lay is not None:
        native.wake_workers(x)
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            return compiled.group_norm(x, weight, bias, groups, eps, native._MODES[mode], lay)
        return _group_apply(x, weight, bias, groups, eps, mode, lay, [])
    policy = Policy("instance") if groups == x.shape[1] else Policy("group", groups)
    return channel_norm(x, weight, bias, policy, eps, mode=mode, moments=False)[0]


@dataclass
class BatchStatistics:
    """What a BN-family method normalizes with: the prepared per-(n, c) moments of the input, and the
    per-channel BN statistics -- the batch's (``batch`` set, ``count`` its elements per channel) or the
    running ones (``batch`` and ``count`` None). ``mean``/``var`` have shape ``(1, C)``."""

    prepared: kernels.Prepared
    mean: Tensor
    var: Tensor
    batch: Optional[Moments]
    count: Optional[int]


def batch_or_running(name: str, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool) -> BatchStatistics:
    """Per-(n, c) moments of ``x`` and the BatchNorm statistics to use: batch statistics in training or
    without running statistics (then more than one value per channel is required), else the running ones.
    Methods that mix BN with per-sample statistics (Batch-Instance Norm, Switchable Norm) start here."""
    c = x.shape[1]
    use_batch = training or running_mean is None or running_var is None
    if use_batch:
        _checks.check_batch_stats(name, x, x.numel() // c if x.numel() else 0)
    with torch.no_grad():
        p = kernels.prepare(x)
    if use_batch:
        batch = Policy("batch").reduce(p.rows)  # (1, C)
        return BatchStatistics(p, batch.mean, batch.var(0), batch, int(batch.count))
    return BatchStatistics(p, running_mean.unsqueeze(0), running_var.unsqueeze(0), None, None)


def native_batch_or_running(name: str, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            training: bool) -> Optional[bool]:
    """:func:`batch_or_running`'s rule for methods whose O(N C) algebra runs in C (Switchable Norm,
    Batch-Instance Norm): ``None`` when the native kernels cannot take ``x`` (or the running buffers);
    otherwise whether the BN part uses the batch's statistics (checked to have more than one value per
    channel). Also wakes the kernels' workers."""
    given = [t for t in (running_mean, running_var) if t is not None]
    if x.dim() <= 2 or not native.supports(x) or (given and not native.running_update_applies(running_mean,
                                                                                                 running_var)):
        return None
    native.wake_workers(x)
    use_batch = training or running_mean is None or running_var is None
    if use_batch:
        _checks.check_batch_stats(name, x, x.numel() // x.shape[1] if x.numel() else 0)
    return use_batch


def fixed_affine(x: Tensor, mean: Tensor, var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                 eps: float, mean_only: bool = False) -> Tensor:
    """Normalize with given (running) per-channel statistics: ``y = gamma (x - mean) / sqrt(var + eps) + beta``.

    Differentiable in ``x``, ``weight`` and ``bias``, twice too (the statistics are constants here, as in eval
    mode). Where the native kernels take ``x``, the compiled op ``normzoo::batch_norm_fixed`` (or
    :class:`_FixedBatchFn`): ``rstd`` in double, one pass each way, ``dx = gamma rstd dy``. Otherwise, and for
    statistics that require grad, tensor operations in float32 (float64 for float64 input or statistics).
    """
    lay = native.supported_layout(x)
    stats_grad = torch.is_grad_enabled() and (mean.requires_grad or (var is not None and var.requires_grad))
    if lay is not None and not stats_grad:
        native.wake_workers(x)
        var = None if mean_only else var
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            return compiled.batch_norm_fixed(x, weight, bias, mean, var, eps, int(mean_only), lay)
        return _fixed_apply(x, weight, bias, mean, var, eps, "mean" if mean_only else "standard", lay)
    acc = torch.float64 if torch.float64 in (mean.dtype, x.dtype) else torch.float32
    rstd = torch.ones_like(mean, dtype=acc) if mean_only else torch.rsqrt(var.to(acc) + eps)
    a = rstd if weight is None else rstd * weight.to(acc)
    b = -a * mean.to(acc)
    if bias is not None:
        b = b + bias.to(acc)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(b.to(x.dtype).view(shape), x, a.to(x.dtype).view(shape))


__all__ = ["Policy", "channel_norm", "fused_backward", "batch_stats_norm", "sample_norm", "fixed_affine",
           "batch_or_running", "native_batch_or_running", "BatchStatistics"]
