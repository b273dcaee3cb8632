"""Batch Renormalization (Ioffe 2017): BatchNorm whose training output is pulled towards the running statistics.

Per channel, with the batch statistics ``mu_B``, ``var_B`` (biased, over N and space) and the running
statistics ``mu``, ``var``::

    sigma_B = sqrt(var_B + eps),        sigma = sqrt(var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max)          (no gradient: stop_gradient in the paper)
    d = clip((mu_B - mu) / sigma, -d_max, d_max)       (no gradient)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta  (training)
    y = gamma * (x - mu) / sigma + beta                (eval: the running statistics)

Without clipping ``(x - mu_B) / sigma_B * r + d = (x - mu) / sigma``: training computes the inference
function, while the gradient still sees the batch statistics. With ``r_max = 1``, ``d_max = 0`` it is
exactly BatchNorm. The running statistics are updated with the batch statistics *after* ``r`` and ``d``
are taken (the paper's Algorithm 1).

Implementation: exactly BatchNorm with the per-channel weight ``gamma * r`` and bias ``beta + gamma * d``
(``r``, ``d`` detached), so it costs what BatchNorm costs. With the native kernels (CPU; float32, float64 or bfloat16
running statistics) it *is* BatchNorm's kernel: ``r`` and ``d`` are computed per channel between the
statistics and the output, the running statistics updated after, and the backward is BatchNorm's with
weight ``gamma r`` (then ``dgamma = r sum dy x_hat + d sum dy``). Elsewhere the per-(n, c) moments are
computed once (:func:`normzoo.kernels.prepare`); ``r`` and ``d`` come from them and the same prepared data
is handed to :func:`normzoo.channel_norm.channel_norm` (``x`` is not read a second time).

Where normzoo, the paper and common code differ:

- **Running statistics.** The paper keeps moving averages of ``mu`` and ``sigma``; normzoo keeps
  ``running_mean`` and ``running_var`` exactly as ``torch.nn.BatchNorm`` does (torch's momentum
  convention, unbiased batch variance, ``momentum=None`` for a cumulative average) and uses
  ``sigma = sqrt(running_var + eps)``. So a BatchNorm checkpoint loads unchanged and the running
  statistics are in the ``state_dict`` (some public ports keep them in plain attributes and lose them).
- **epsilon** is inside the square roots, as in the paper (several ports add it to ``sigma``).
- **Warm-up.** The paper trains with ``r_max = 1``, ``d_max = 0`` (plain BN) for the first 5000 steps,
  then relaxes them linearly to ``r_max = 3`` at step 40k and ``d_max = 5`` at step 25k. The layer itself
  holds constant limits (default ``r_max=3``, ``d_max=5``, changeable with :meth:`set_limits`);
  :class:`RenormSchedule` steps the paper's warm-up (configurable) from the training loop, like an
  LR scheduler.
- ``track_running_stats=False`` is refused: without running statistics there is no renormalization.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from normzoo import _checks, kernels, native, native_ops
from normzoo._autograd import lean_apply, once_differentiable
from normzoo.channel_norm import Policy, channel_norm, fixed_affine, fused_backward
from normzoo.nn._base import NormBase
from normzoo.registry import register
from normzoo.running import update_running_stats
from normzoo.stats import accumulation_dtype


def _check_limits(name: str, r_max: float, d_max: float) -> Tuple[float, float]:
    for what, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < low:
            raise ValueError(f"{name}: {what} must be a number >= {low} (inf for no clipping), got {value!r}")
    return float(r_max), float(d_max)


def renorm_correction(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor, running_var: Tensor,
                      eps: float, r_max: float, d_max: float) -> Tuple[Tensor, Tensor]:
    """The paper's ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``.

    ``batch_var`` is the biased batch variance; all tensors are per channel. Returned detached, in the
    dtype of ``batch_mean``.
    """
    with torch.no_grad():
        acc = batch_mean.dtype
        inv_sigma = torch.rsqrt(running_var.to(acc) + eps)
        r = (torch.sqrt(batch_var + eps) * inv_sigma).clamp_(1.0 / r_max, r_max)
        d = ((batch_mean - running_mean.to(acc)) * inv_sigma).clamp_(-d_max, d_max)
    return r, d


class _BatchRenormFn(torch.autograd.Function):
    """Batch Renorm in training as one native call each way: the BatchNorm kernels with weight ``gamma r`` and
    bias ``beta + gamma d``, ``r``/``d`` computed per channel inside the forward kernel (from the running
    statistics read before the kernel updates them), and BatchNorm's backward kernel with the weight ``gamma r``,
    which also forms ``dgamma = r sum dy x_hat + d sum dy`` (``dbeta = sum dy``). ``out`` receives the forward's
    float64 ``(5, C)`` block (mean, M2, rstd, r, d); nothing else is made per step."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                running_var: Tensor, momentum: float, eps: float, r_max: float, d_max: float, out: list) -> Tensor:
        y, stats = native.batch_renorm_forward(x, weight, bias, eps, running_mean, running_var, momentum, r_max,
                                               d_max)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, stats)
        out.append(stats)
        return y

    @staticmethod
    @once_differentiable  # r, d and the statistics are constants here: no silent wrong second derivative
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        def kernel(x: Tensor, weight: Optional[Tensor], stats: Tensor, dgamma: bool, dbeta: bool) -> Tuple:
            return native.batch_backward(dy, x, weight, stats, "standard", dgamma, dbeta, bias_dtype=ctx.bias_dtype,
                                         renorm=True)

        return (*fused_backward(ctx, kernel), None, None, None, None, None, None, None)


_renorm_apply = lean_apply(_BatchRenormFn)


def _batch_renorm(name: str, input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float, eps: float,
                  r_max: float, d_max: float) -> Tuple[Tensor, Optional[Tensor]]:
    """Batch renorm; returns ``(y, rd)``: ``rd`` a ``(k, C)`` tensor whose last two rows are ``r`` and ``d``
    (the native forward's statistics block, or the two alone), None in eval."""
    _checks.check_input(name, input, (2, 3, 4, 5), shape_hint="(N, C, *spatial)")
    return _batch_renorm_checked_input(name, input, running_mean, running_var, weight, bias, training, momentum, eps,
                                       r_max, d_max)


def _batch_renorm_checked_input(name: str, input: Tensor, running_mean: Optional[Tensor],
                                running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                                training: bool, momentum: float, eps: float, r_max: float,
                                d_max: float) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`_batch_renorm` of an input whose rank and dtype a module has checked (before it counted the batch)."""
    _checks.check_eps(name, eps)
    r_max, d_max = _check_limits(name, r_max, d_max)
    c = input.shape[1]
    _checks.check_channel_params(name, c, weight=weight, bias=bias, running_mean=running_mean,
                                 running_var=running_var)
    if running_mean is None or running_var is None:
        raise ValueError(f"{name}: batch renormalization needs running_mean and running_var (got None)")
    if not training:
        return fixed_affine(input, running_mean, running_var, weight, bias, eps), None
    _checks.check_batch_stats(name, input, input.numel() // c if input.numel() else 0)
    lay = native.supported_layout(input)
    if lay is not None and native.running_update_applies(running_mean, running_var):
        native.wake_workers(input)
        compiled = native_ops.ops()
        if compiled is not None:  # the same op with its autograd in C++
            return compiled.batch_norm_stats(input, weight, bias, running_mean, running_var, momentum, eps, 0, lay,
                                             True, r_max, d_max, 0.0, None, None)
        out: list = []
        y = _renorm_apply(input, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max, out)
        return y, out[0]
    p = kernels.prepare(input)
    batch = p.rows.reduce(0)  # (C,), count N * prod(S); float64 when rows were centred (see kernels.prepare)
    r, d = renorm_correction(batch.mean, batch.var(0), running_mean, running_var, eps, r_max, d_max)
    acc = accumulation_dtype(input.dtype)
    r, d = r.to(acc), d.to(acc)
    if weight is not None:
        w = weight.to(r.dtype) * r
        b = weight.to(d.dtype) * d
    else:
        w, b = r, d
    if bias is not None:
        b = b + bias.to(b.dtype)
    y, _ = channel_norm(input, w, b, Policy("batch"), eps, prepared=p)
    update_running_stats(running_mean, running_var, batch, momentum)
    return y, torch.stack([r, d])


def batch_renorm(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 r_max: float = 3.0, d_max: float = 5.0) -> Tensor:
    """Batch Renormalization of ``input`` ``(N, C)`` or ``(N, C, *S)`` (see :mod:`normzoo.nn.renorm`).

    Signature of ``torch.nn.functional.batch_norm`` plus the clipping limits ``r_max >= 1`` and
    ``d_max >= 0`` (``inf`` disables the clipping). ``running_mean``/``running_var`` are required; in
    training they are read to form ``r``, ``d`` and then updated in place with the batch statistics
    (torch's momentum convention, unbiased variance). Eval normalizes with them.
    """
    return _batch_renorm("batch_renorm", input, running_mean, running_var, weight, bias, training, momentum, eps,
                         r_max, d_max)[0]


class _BatchRenorm(NormBase):
    """Batch Renormalization (Ioffe 2017) with ``torch.nn.BatchNorm``'s signature, parameters and buffers.

    Training: ``y = gamma ((x - mu_B) / sigma_B * r + d) + beta`` with the detached corrections
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` from
    the running statistics; then the running statistics are updated as BatchNorm's. Eval:
    ``gamma (x - mu) / sigma + beta``. ``r_max = 1``, ``d_max = 0`` is BatchNorm exactly.

    Args (beyond BatchNorm's): ``r_max`` (>= 1, default 3) and ``d_max`` (>= 0, default 5), keyword-only:
    the clipping limits, the final values of the paper's warm-up. Change them with :meth:`set_limits`,
    or let :class:`RenormSchedule` follow the paper's warm-up. After each training step ``last_r`` and
    ``last_d`` (detached, per channel) hold the corrections used. A ``torch.nn.BatchNorm*`` checkpoint
    loads as is. See :mod:`normzoo.nn.renorm` for where the paper and common code differ.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *, bias: bool = True,
                 r_max: float = 3.0, d_max: float = 5.0) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(f"{name}: batch renormalization is defined by its running statistics; "
                             "track_running_stats must be True")
        self.r_max, self.d_max = _check_limits(name, r_max, d_max)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._last_rd: Optional[Tuple[Tensor, torch.dtype]] = None  # (the step's rd, the input's dtype)

    @property
    def last_r(self) -> Optional[Tensor]:
        """``r`` of the last training step (detached, ``(C,)``, in the input's accumulation dtype); None before one."""
        return self._last_correction(-2)

    @property
    def last_d(self) -> Optional[Tensor]:
        """``d`` of the last training step (as :attr:`last_r`)."""
        return self._last_correction(-1)

    def _last_correction(self, row: int) -> Optional[Tensor]:
        # made on access from the step's block: a training step pays for no conversion it may never need
        if self._last_rd is None:
            return None
        rd, dtype = self._last_rd
        return rd[row].to(accumulation_dtype(dtype))

    def set_limits(self, r_max: float, d_max: float) -> None:
        """Set the clipping limits used from the next training step on (``r_max >= 1``, ``d_max >= 0``)."""
        self.r_max, self.d_max = _check_limits(type(self).__name__, r_max, d_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def forward(self, input: Tensor) -> Tensor:
        x = self._check_input(input)
        if self.training:
            self._check_batch_stats(x)
        weight, bias, running_mean, running_var, counter = self._state()
        factor = self._momentum_factor(counter)
        y, rd = _batch_renorm_checked_input(type(self).__name__, x, running_mean, running_var, weight, bias,
                                            self.training, factor, self.eps, self.r_max, self.d_max)
        if self.training:
            self.__dict__["_last_rd"] = (rd, x.dtype)  # past nn.Module.__setattr__'s checks, once per step
        return y


@register("brn1d", "batchrenorm1d")
class BatchRenorm1d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__
    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


@register("brn2d", "batchrenorm2d", "brn")
class BatchRenorm2d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


@register("brn3d", "batchrenorm3d")
class BatchRenorm3d(_BatchRenorm):
    __doc__ = _BatchRenorm.__doc__
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


class RenormSchedule:
    """The paper's warm-up of the clipping limits, stepped from the training loop like an LR scheduler.

    ``r_max`` rises linearly from 1 to ``r_max`` over the steps ``r_steps = (start, end)`` and ``d_max``
    from 0 to ``d_max`` over ``d_steps``; before ``start`` the layers are plain BatchNorm. Defaults are
    the paper's ImageNet recipe: ``r_steps=(5000, 40000)``, ``d_steps=(5000, 25000)``, final
    ``r_max=3``, ``d_max=5``. Scale the steps to your run length (they count optimizer steps).

    >>> sched = RenormSchedule(model)          # every Batch Renorm layer in model, limits (1, 0) now
    >>> for batch in data:
    ...     loss(model(batch)).backward(); opt.step(); sched.step()

    ``state_dict()``/``load_state_dict()`` save and restore the step count, as torch's schedulers do.
    """

    def __init__(self, modules: Union[nn.Module, Iterable[nn.Module]], r_max: float = 3.0, d_max: float = 5.0,
                 r_steps: Tuple[int, int] = (5000, 40000), d_steps: Tuple[int, int] = (5000, 25000),
                 last_step: int = 0) -> None:
        name = "RenormSchedule"
        self.r_max, self.d_max = _check_limits(name, r_max, d_max)
        for what, (start, end) in (("r_steps", r_steps), ("d_steps", d_steps)):
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError(f"{name}: {what} must be (start, end) ints with 0 <= start <= end, "
                                 f"got {(start, end)!r}")
        self.r_steps, self.d_steps = tuple(r_steps), tuple(d_steps)
        roots = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.layers: List[_BatchRenorm] = [m for root in roots for m in root.modules() if isinstance(m, _BatchRenorm)]
        if not self.layers:
            raise ValueError(f"{name}: found no Batch Renorm layer in the given module(s)")
        self.last_step = int(last_step)
        self._apply()

    @staticmethod
    def _ramp(step: int, start: int, end: int) -> float:
        if step <= start:
            return 0.0
        if step >= end:
            return 1.0
        return (step - start) / (end - start)

    def limits(self, step: int) -> Tuple[float, float]:
        """``(r_max, d_max)`` at ``step``."""
        t_r, t_d = self._ramp(step, *self.r_steps), self._ramp(step, *self.d_steps)
        r = 1.0 + (self.r_max - 1.0) * t_r if t_r > 0 else 1.0  # (guard: inf * 0)
        d = self.d_max * t_d if t_d > 0 else 0.0
        return r, d

    def _apply(self) -> None:
        r, d = self.limits(self.last_step)
        for m in self.layers:
            m.set_limits(r, d)

    def step(self) -> None:
        """Advance one step and set the limits of every layer."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step, "r_max": self.r_max, "d_max": self.d_max,
                "r_steps": self.r_steps, "d_steps": self.d_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.r_max, self.d_max = _check_limits("RenormSchedule", state["r_max"], state["d_max"])
        self.r_steps, self.d_steps = tuple(state["r_steps"]), tuple(state["d_steps"])
        self.last_step = int(state["last_step"])
        self._apply()


__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule", "batch_renorm", "renorm_correction"]
