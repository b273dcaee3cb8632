"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le 2020): normalization and activation in one layer.

Found by evolutionary search over computation graphs; for ``x`` of shape ``(N, C, *S)`` and per-channel
learned ``v`` (init 1), ``gamma`` (init 1), ``beta`` (init 0):

**B0** (batch-dependent)::

    y = x / max( sqrt(s2_batch + eps),  v * x + sqrt(s2_inst + eps) ) * gamma + beta

with ``s2_batch`` the variance per channel over ``(N, *S)`` and ``s2_inst`` the variance per sample and
channel over ``S``. In eval mode ``s2_batch`` is the running variance.

**S0** (batch-independent)::

    y = x * sigmoid(v * x) / sqrt(s2_group + eps) * gamma + beta

with ``s2_group`` the variance per sample over a group of ``C / groups`` channels and ``S``, as in
GroupNorm (default ``groups``: the largest divisor of ``C`` not above 32). The numerator is a SiLU-like
gate ``x * sigmoid(v x)``; the denominator is the group std of ``x`` itself, not of the gated value.

Neither layer subtracts a mean from ``x``; both contain their own nonlinearity, so they replace a
``norm + ReLU`` pair.

Conventions where the paper and common code differ:

- **epsilon** is inside the square roots (paper, the authors' reference code and timm agree).
- **Variances are biased** (divide by the count) when normalizing, as in the paper.
- **Running variance** (B0): torch's momentum convention ``running = (1 - momentum) running + momentum
  batch``, default 0.1, with the *unbiased* batch variance ``M2 / (m - 1)`` as ``torch.nn.BatchNorm`` (the
  authors' reference code averages the biased variance with decay 0.99, i.e. momentum 0.01);
  ``momentum=None`` gives the cumulative average. Eval without ``track_running_stats`` uses batch
  statistics, as torch's BatchNorm.
- **Ties** (B0): where ``sqrt(s2_batch + eps) == v x + sqrt(s2_inst + eps)`` each side of the max gets half
  of the gradient, as ``torch.maximum``'s backward gives it; both paths below agree on this.
- **Numerics**: the reference code computes ``E[x^2] - E[x]^2``; here the statistics are stable (a channel
  with mean 1e4 and std 1e-2 keeps its variance in float32) and a constant input gives a finite output (the
  variances are 0 and ``eps`` keeps the denominators positive).

Two implementations, with the same results:

- **Native** (CPU; float32, float64, bfloat16; contiguous or channels_last: where
  :func:`normzoo.native.supports` holds): an autograd Function with a hand-derived backward whose full-size
  passes are C kernels (:mod:`normzoo.native_evonorm`): S0 fused per (sample, group) block (per sample in
  channels_last), two passes each way for B0 (in the contiguous layout a block of channels at a time, the
  second from the cache). Arithmetic in float32 (float64 for float64 input), statistics in float64 (exact
  shifted sums); saved for backward: the input and O(N C) statistics. The gradients flow through the
  variances (they are not treated as constants).
- **Formula** (everything else: GPU, float16, other layouts, ``NORMZOO_NATIVE=0``): the formula in torch
  operations. Per-(n, c) moments come from a stable reduction (``torch.var_mean``, accumulated in float32,
  float64 for float64 input) and are merged into batch or group moments with
  :meth:`normzoo.stats.Moments.reduce` (Chan's formula); groups whose mean is large next to their spread are
  recomputed around their (constant) mean (:func:`merged_moments`). The gradient is autograd's through the
  whole formula; the graph is rebuilt in backward (:class:`_Rematerialize`), so only the input and the
  parameters are saved for backward.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from normzoo import _checks, kernels, native, native_evonorm, native_ops
from normzoo._autograd import grad_as, once_differentiable
from normzoo.nn.group import default_groups
from normzoo.registry import register
from normzoo.running import count_batch_
from normzoo.stats import Moments, accumulation_dtype, ill_conditioned

_INPUT_DIMS = (2, 3, 4, 5)
_SHAPE_HINT = "(N, C, *spatial) with at most 3 spatial dims"


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` -> ``(1, C, 1, ...)``; ``(N, C)`` -> ``(N, C, 1, ...)``: broadcastable against ``x``."""
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return t.view(t.shape + (1,) * (x.dim() - 2))


def instance_moments(x: Tensor) -> Moments:
    """Differentiable per-(n, c) moments of ``x`` ``(N, C, *S)`` over ``S``, in the accumulation dtype.

    ``torch.var_mean`` (a stable reduction) gives ``mean`` and the biased variance; ``m2 = var * |S|``.
    Autograd flows through ``mean`` and ``m2``, and through :meth:`Moments.reduce` merges of them.
    """
    acc = accumulation_dtype(x.dtype)
    xa = x if x.dtype == acc else x.to(acc)
    spatial = tuple(range(2, x.dim()))
    if not spatial:
        return Moments(1, xa, torch.zeros_like(xa))
    count = x.shape[2:].numel()
    var, mean = torch.var_mean(xa, spatial, correction=0)
    return Moments(count, mean, var * count)


def merged_moments(x: Tensor, merge: Callable[[Moments], Moments],
                   spread: Callable[[Tensor], Tensor]) -> Tuple[Moments, Moments]:
    """Instance moments of ``x`` and their ``merge`` into groups (batch or channel groups), differentiable.

    Merging instance moments (Chan's formula) is exact in exact arithmetic, but per-(n, c) means rounded to
    float32 lose the spread of a group whose mean is large next to its standard deviation (an ulp of 1e4 is
    1e-3). Such groups (:func:`normzoo.stats.ill_conditioned`) are recomputed from ``x - shift``, with
    ``shift`` the group mean held constant (detached; ``spread`` maps it to a tensor broadcastable against
    ``x``): variances do not depend on the shift, their gradients neither, and the shifted data is
    centred. The returned **means** are then those of the shifted data; use only the variances.
    """
    inst = instance_moments(x)
    group = merge(inst)
    if bool(ill_conditioned(group.detach(), x.dtype).any()):
        acc = inst.mean.dtype
        shift = spread(group.mean.detach())
        inst = instance_moments((x if x.dtype == acc else x.to(acc)) - shift)
        group = merge(inst)
    return inst, group


class _Rematerialize(torch.autograd.Function):
    """Run ``fn(*tensors)`` without keeping its graph: save only the inputs, rebuild the graph in backward.

    EvoNorm's activation is elementwise (a max against ``v x``, a sigmoid), so plain autograd would keep
    several input-sized intermediates alive until backward (4x the input). Saving only the inputs keeps
    the saved-for-backward memory at one input plus the O(C) parameters, for the price of one more forward
    pass during backward. Inputs go through ``save_for_backward``, so saved-tensor hooks still see them.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], *tensors: Optional[Tensor]) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return fn(*tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[1:]) if t is not None and need]
        with torch.enable_grad():
            y = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True)) if wanted else iter(())
        return (None,) + tuple(next(grads) if t is not None and need else None
                               for t, need in zip(inputs, ctx.needs_input_grad[1:]))


def _wanted(ctx: Any) -> Tuple[bool, bool, bool]:
    """Which of dgamma, dbeta, dv the backward must compute (inputs 1, 2, 3 of the Functions below; an absent
    parameter needs none)."""
    need = ctx.needs_input_grad
    return bool(need[1]), bool(need[2]), bool(need[3])


class _S0Native(torch.autograd.Function):
    """EvoNorm-S0 on the native kernels: ``y = gamma r x s + beta``, ``s = sigmoid(v x)``, ``r = (var_(n, g) + eps)^-1/2``.

    Backward (``M = (C / G) |S|``, ``mu`` the group mean, sums over the group of sample n)::

        dx     = gamma r dy s (1 + v x (1 - s)) - A r^3 (x - mu) / M,   A = sum dy gamma x s
        dgamma = sum_(n, S) r dy x s,   dbeta = sum_(n, S) dy,   dv = sum_(n, S) gamma r dy x^2 s (1 - s)

    Saved: ``x``, the parameters and the float64 ``(N, G)`` group mean and ``r``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor],
                groups: int, eps: float) -> Tensor:
        y, mean, rstd = native_evonorm.s0_forward(x, groups, weight, bias, v, eps)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, bias, v, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, bias, v, mean, rstd = ctx.saved_tensors
        native.wake_workers(x)
        dx, dg, db, dv = native_evonorm.s0_backward(dy, x, ctx.groups, weight, v, mean, rstd,
                                                    _wanted(ctx))
        return (dx if ctx.needs_input_grad[0] else None, grad_as(dg, weight), grad_as(db, bias), grad_as(dv, v), None,
                None)


class _B0Native(torch.autograd.Function):
    """EvoNorm-B0 on the native kernels: ``y = gamma x / d + beta``, ``d = max(sigma_b, v x + sigma_i)``.

    ``sigma_b = sqrt(var_b + eps)`` per channel (the batch's biased variance over ``(N, *S)``, or ``fixed_var``),
    ``sigma_i = sqrt(var_i + eps)`` per (n, c) over ``S``. Backward, with ``u = dy gamma`` and ``e = -u x / d^2``::

        dx = u / d + [inst] v e + S_b (x - mu_b) / (N |S| sigma_b) [batch variance] + S_i (x - mu_i) / (|S| sigma_i)

    ``S_b[c]``: the sum of ``e`` where the batch side is the max, ``S_i[n, c]``: where the instance side is (a tie
    gives each side half, as ``torch.maximum``); ``dv = sum_inst e x``, ``dgamma = sum dy x / d``, ``dbeta = sum dy``.
    ``stats`` (a list) receives the :class:`normzoo.native_evonorm.B0State` (batch mean and M2 for the
    running variance); ``update``: ``(running_var, momentum)`` for the kernel to update (a buffer it takes). Saved:
    ``x``, the parameters and ``2 N C + 3 C`` float64 statistics.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor],
                fixed_var: Optional[Tensor], eps: float, stats: list,
                update: Optional[Tuple[Tensor, float]] = None) -> Tensor:
        y, state = native_evonorm.b0_forward(x, weight, bias, v, eps, fixed_var, *(update or ()))
        stats.append(state)
        ctx.use_batch, ctx.nc = fixed_var is None, tuple(x.shape[:2])
        ctx.save_for_backward(x, weight, bias, v, state.buf)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, bias, v, buf = ctx.saved_tensors
        native.wake_workers(x)
        state = native_evonorm.B0State(buf, *ctx.nc)
        dx, dg, db, dv = native_evonorm.b0_backward(dy, x, weight, v, state, ctx.use_batch,
                                                    _wanted(ctx))
        return (dx if ctx.needs_input_grad[0] else None, grad_as(dg, weight), grad_as(db, bias), grad_as(dv, v), None,
                None, None, None)


def _check_common(name: str, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  v: Optional[Tensor], eps: float) -> int:
    _checks.check_input(name, input, _INPUT_DIMS, shape_hint=_SHAPE_HINT)
    _checks.check_eps(name, eps)
    c = input.shape[1]
    _checks.check_channel_params(name, c, weight=weight, bias=bias, v=v)
    return c


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor) -> Tensor:
    if weight is not None:
        y = y * _per_channel(weight, x).to(y.dtype)
    if bias is not None:
        y = y + _per_channel(bias, x).to(y.dtype)
    return y


def evonorm_b0(
    input: Tensor,
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""EvoNorm-B0: ``x / max(sqrt(s2_batch + eps), v x + sqrt(s2_inst + eps)) * gamma + beta``.

    Args:
        input: ``(N, C, *S)``, up to 3 spatial dims (none: ``s2_inst = 0``).
        running_var: ``(C,)`` running variance or None. Used instead of the batch variance when
            ``training`` is False; updated in place (unbiased batch variance, factor ``momentum``) when
            ``training`` is True.
        weight, bias, v: ``gamma``, ``beta``, ``v`` of shape ``(C,)``, or None (1, 0 and 1).
        training: use (and track) the batch variance.
        momentum: the running-average factor of this step (``running.lerp_(batch, momentum)``).
        eps: added to both variances inside the square roots.
    """
    name = "evonorm_b0"
    c = _check_common(name, input, weight, bias, v, eps)
    _checks.check_param(name, "running_var", running_var, (c,))
    use_batch = training or running_var is None
    if use_batch:
        _checks.check_batch_stats(name, input, input.numel() // c if input.numel() else 0)
    lay = native.supported_layout(input)
    if lay is not None:
        native.wake_workers(input)
        # the running variance updated in the kernel where it takes the buffer, else here (after the kernel)
        track = training and running_var is not None
        in_kernel = track and native.running_update_applies(None, running_var)
        update = (running_var, momentum) if in_kernel else None
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            y, buf = compiled.evonorm_b0(input, weight, bias, v, running_var if in_kernel or not use_batch else None,
                                         use_batch, momentum, eps, lay)
        else:
            stats: list = []
            y = _B0Native.apply(input, weight, bias, v, None if use_batch else running_var, eps, stats, update)
            buf = stats[0].buf
        if track and not in_kernel:
            with torch.no_grad():  # unbiased batch variance from the kernels' exact batch moments
                m2_b = native_evonorm.B0State(buf, *input.shape[:2]).m2_b
                running_var.lerp_((m2_b / (input.numel() // c - 1)).to(running_var.dtype), momentum)
        return y
    if use_batch:
        if training and running_var is not None:
            with torch.no_grad():  # exact batch moments from the statistics core
                batch = kernels.prepare(input).rows.reduce(0)
                running_var.lerp_(batch.var(1).to(running_var.dtype), momentum)
    fixed_var = None if use_batch else running_var

    def formula(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor]) -> Tensor:
        if fixed_var is None:
            inst, batch = merged_moments(x, lambda m: m.reduce(0), lambda mean: _per_channel(mean, x))
            var_b = batch.var(0)
        else:
            inst = instance_moments(x)
            var_b = fixed_var.to(inst.mean.dtype)
        acc = inst.mean.dtype
        left = _per_channel(torch.sqrt(var_b + eps), x)
        vx = x.to(acc) if v is None else x.to(acc) * _per_channel(v.to(acc), x)
        right = vx + _per_channel(torch.sqrt(inst.var(0) + eps), x)
        return _affine((x.to(acc) / torch.maximum(left, right)).to(x.dtype), weight, bias, x)

    return _Rematerialize.apply(formula, input, weight, bias, v)


def evonorm_s0(
    input: Tensor,
    groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""EvoNorm-S0: ``x * sigmoid(v x) / sqrt(s2_group + eps) * gamma + beta``.

    Args:
        input: ``(N, C, *S)``, up to 3 spatial dims.
        groups: number of channel groups (must divide ``C``); ``s2_group`` is the biased variance over a
            group's channels and ``S``, per sample.
        weight, bias, v: ``gamma``, ``beta``, ``v`` of shape ``(C,)``, or None (1, 0 and 1).
        eps: added to the group variance inside the square root.
    """
    name = "evonorm_s0"
    c = _check_common(name, input, weight, bias, v, eps)
    _checks.check_groups(name, groups, c)
    lay = native.supported_layout(input)
    if lay is not None:
        native.wake_workers(input)
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            return compiled.evonorm_s0(input, weight, bias, v, groups, eps, lay)
        return _S0Native.apply(input, weight, bias, v, groups, eps)
    n = input.shape[0]

    def per_row(t: Tensor) -> Tensor:  # (N, G) -> (N, C)
        return t.unsqueeze(2).expand(n, groups, c // groups).reshape(n, c)

    def formula(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], v: Optional[Tensor]) -> Tensor:
        _, group = merged_moments(x, lambda m: m.reshape(n, groups, c // groups).reduce(2),
                                  lambda mean: _per_channel(per_row(mean), x))
        rstd = per_row(torch.rsqrt(group.var(0) + eps))
        xa = x.to(rstd.dtype)
        gate = torch.sigmoid(xa if v is None else xa * _per_channel(v.to(rstd.dtype), x))
        return _affine((xa * gate * _per_channel(rstd, x)).to(x.dtype), weight, bias, x)

    return _Rematerialize.apply(formula, input, weight, bias, v)


class _EvoNorm(nn.Module):
    """Parameters shared by B0 and S0: ``weight`` (gamma), ``bias`` (beta) and ``v``, each of shape ``(C,)``."""

    def __init__(self, num_features: int, eps: float, affine: bool, device: Any, dtype: Any) -> None:
        name = type(self).__name__
        _checks.check_positive_int(name, "num_features", num_features)
        _checks.check_eps(name, eps)
        super().__init__()
        self.num_features, self.eps, self.affine = num_features, eps, affine
        factory = {"device": device, "dtype": dtype}
        self.v = nn.Parameter(torch.empty(num_features, **factory))
        for pname in ("weight", "bias"):
            self.register_parameter(pname, nn.Parameter(torch.empty(num_features, **factory)) if affine else None)
        self.weight: Optional[Tensor]
        self.bias: Optional[Tensor]

    def reset_parameters(self) -> None:
        """``v`` = 1, ``weight`` = 1, ``bias`` = 0 (the paper's initialization)."""
        with torch.no_grad():
            self.v.fill_(1.0)
            if self.weight is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()  # type: ignore[union-attr]

    def _check(self, input: Tensor) -> Tensor:
        return _checks.check_input(type(self).__name__, input, _INPUT_DIMS, self.num_features, _SHAPE_HINT)


@register("evonorm_b0", "evonormb0")
class EvoNormB0(_EvoNorm):
    r"""EvoNorm-B0: ``y = x / max(sqrt(s2_batch + eps), v x + sqrt(s2_inst + eps)) * gamma + beta``.

    Batch-dependent like BatchNorm: training uses the batch variance per channel (and updates
    ``running_var``), eval uses ``running_var``; the instance variance is always the input's own. See
    :mod:`normzoo.nn.evonorm` for the conventions (epsilon, momentum, unbiased running variance).

    Args:
        num_features: ``C``.
        eps: added inside both square roots (default 1e-5, as the paper's code).
        momentum: running-variance factor (torch convention); None for the cumulative average.
        affine: learn ``weight`` and ``bias`` (``v`` is always learned: it is the nonlinearity).
        track_running_stats: keep ``running_var`` and ``num_batches_tracked`` buffers; without them eval
            uses the batch variance too.

    Shape: ``(N, C, *S)`` with up to 3 spatial dims; training needs more than one value per channel.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None) -> None:
        _checks.check_momentum(type(self).__name__, momentum)
        super().__init__(num_features, eps, affine, device, dtype)
        self.momentum, self.track_running_stats = momentum, track_running_stats
        if track_running_stats:
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.running_var: Optional[Tensor]
        self.num_batches_tracked: Optional[Tensor]
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.running_var is not None:
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Running variance to 1, ``v`` and ``weight`` to 1, ``bias`` to 0."""
        self.reset_running_stats()
        super().reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        x = self._check(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            count = count_batch_(self.num_batches_tracked)
            if self.momentum is None:
                factor = 1.0 / count
        return evonorm_b0(x, self.running_var, self.weight, self.bias, self.v,
                          self.training or self.running_var is None, factor, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


@register("evonorm_s0", "evonorms0")
class EvoNormS0(_EvoNorm):
    r"""EvoNorm-S0: ``y = x * sigmoid(v x) / sqrt(s2_group + eps) * gamma + beta``.

    Batch-independent like GroupNorm: the same computation in train and eval, no running statistics.
    See :mod:`normzoo.nn.evonorm` for the conventions.

    Args:
        num_features: ``C``.
        groups: channel groups for the variance; default the largest divisor of ``C`` not above 32
            (as :func:`normzoo.nn.group.default_groups`). Must divide ``C``.
        eps: added inside the square root (default 1e-5).
        affine: learn ``weight`` and ``bias`` (``v`` is always learned).

    Shape: ``(N, C, *S)`` with up to 3 spatial dims.
    """

    def __init__(self, num_features: int, groups: Optional[int] = None, eps: float = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        self.groups = default_groups(num_features) if groups is None else groups
        _checks.check_groups(type(self).__name__, self.groups, num_features)
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        return evonorm_s0(self._check(input), self.groups, self.weight, self.bias, self.v, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}, affine={self.affine}"


__all__ = ["evonorm_b0", "evonorm_s0", "instance_moments", "merged_moments", "EvoNormB0", "EvoNormS0"]
