"""SyncBatchNorm: BatchNorm (and mean-only BatchNorm) with statistics over every process of a group.

With data parallelism each process sees a slice of the batch; BatchNorm's statistics then cover only that
slice (a batch of 2 per GPU normalizes with 2 samples). SyncBatchNorm merges the statistics of all
processes so that training on ``P`` processes gives the outputs, input gradients, parameter gradients and
running statistics of one process on the whole batch (parameter gradients as local contributions that
DDP sums or averages, as ``torch.nn.SyncBatchNorm`` does).

Communication, per training step (any backend: gloo on CPU, NCCL on GPU):

- **forward**: one ``all_gather`` of each process's per-channel moments packed as ``(count, count*mean, M2)``
  (``3 * C`` numbers per process, float64), merged exactly for any batch sizes with Chan's formula
  (:meth:`normzoo.stats.Moments.reduce`). Unlike an ``all_reduce`` of ``(sum x, sum x^2)`` (one collective
  of ``2 * C`` numbers, but ``E[x^2] - E[x]^2`` cancels) this never subtracts two large numbers, so a
  channel with mean 1e4 and std 1e-2 keeps its variance in float32.
- **backward**: one ``all_reduce`` of the per-channel ``sum dy`` and ``sum dy * x_hat`` (``2 * C`` numbers).

A process whose batch is empty (``N == 0``) contributes count 0 and still joins both collectives, so the
others never wait for it forever. Outside an initialized process group, with a group of one process, or
in eval mode, the layer is exactly :class:`normzoo.nn.BatchNorm2d` (and friends): no collective runs in
eval, as in torch, so evaluating on one rank alone cannot hang. Unlike ``torch.nn.SyncBatchNorm`` it runs
on CPU tensors (gloo) too, and supports mean-only BatchNorm (``mean_only=True``).

Other BatchNorm-family methods plug in through :func:`global_batch_moments` (the forward collective, with
the prepared input pass) and :func:`sync_batch_norm` (normalization with given global moments and any
per-channel ``weight``/``bias`` expressions, e.g. Batch Renorm's ``gamma * r`` and ``beta + gamma * d``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from normzoo import _checks, kernels
from normzoo import functional as F
from normzoo._autograd import once_differentiable
from normzoo.channel_norm import Policy, _centre, _group_scale, _with_weight
from normzoo.nn.batch import _BatchNorm
from normzoo.registry import register
from normzoo.stats import Moments, ill_conditioned

_BATCH = Policy("batch")


def world_size(process_group: Any = None) -> int:
    """Processes in ``process_group`` (the default group for None); 1 outside an initialized process group."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def _local_moments(p: kernels.Prepared, num_channels: int, like: Tensor) -> Moments:
    """This process's per-channel moments (``(C,)``, float64); count 0 for an empty batch."""
    rows = p.rows
    if rows.mean.shape[0] == 0:
        zeros = torch.zeros(num_channels, dtype=torch.float64, device=like.device)
        return Moments(0, zeros, zeros.clone())
    m = rows.reduce(0)
    return Moments(m.count, m.mean.double(), m.m2.double())


def all_gather_moments(local: Moments, process_group: Any = None) -> Moments:
    """Merge per-process moments exactly: one ``all_gather`` of ``(count, count*mean, M2)``, then Chan's merge.

    ``local``: moments of this process's data, ``mean``/``m2`` of shape ``(C,)`` (count may be 0). Returns
    the moments of all processes' data together, with a Python ``int`` count (the same for every channel).
    Every process of the group must call it.
    """
    packed = Moments(local.count, local.mean.double(), local.m2.double()).pack().contiguous()
    n = world_size(process_group)
    if n == 1:
        gathered = packed.unsqueeze(1)
    else:
        parts = [torch.empty_like(packed) for _ in range(n)]
        torch.distributed.all_gather(parts, packed, group=process_group)
        gathered = torch.stack(parts, 1)  # (3, P, C)
    merged = Moments.unpack(gathered).reduce(0)
    return Moments(_int_count(merged.count), merged.mean, merged.m2)


def _int_count(count: Any) -> int:
    """The (channel-independent) element count of per-channel moments as a Python int."""
    if isinstance(count, Tensor):
        flat = count.reshape(-1)
        return int(round(float(flat[0]))) if flat.numel() else 0
    return int(count)


def global_batch_moments(input: Tensor, process_group: Any = None) -> Tuple[kernels.Prepared, Moments]:
    """The per-channel moments of the batch of every process, and this process's prepared input pass.

    The forward collective of SyncBatchNorm, exposed for BatchNorm-family methods that compute their own
    coefficients from the global statistics (Batch Renorm's ``r``/``d``): hand both results to
    :func:`sync_batch_norm` as ``prepared=`` and ``moments=`` so that ``input`` is read only once more.
    """
    _checks.check_input("global_batch_moments", input, (2, 3, 4, 5), shape_hint="(N, C, *spatial)")
    with torch.no_grad():  # statistics are constants to autograd; the backward of sync_batch_norm handles them
        p = kernels.prepare(input)
        return p, all_gather_moments(_local_moments(p, input.shape[1], input), process_group)


class _SyncBatchNormFn(torch.autograd.Function):
    """``y = a (x - centre) + b`` with coefficients from the global moments; backward with one ``all_reduce``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mode: str,
                process_group: Any, prepared: Optional[kernels.Prepared], g: Moments) -> Tensor:
        c = x.shape[1]
        p = prepared if prepared is not None else kernels.prepare(x)
        if x.dim() == 2 and not p.exact and p.shift is None and bool(ill_conditioned(g, x.dtype).any()):
            # one element per row: centre on the global mean so that y = a (x - centre) + b stays exact
            p = kernels.prepare(x, shift=g.mean.view(1, c))
        rstd = _group_scale(g, eps, mode)  # (C,), float64 like the merged moments
        a = _with_weight(rstd, weight)
        centre = _centre(g.mean, p.shift, _BATCH, c, mode)  # (C,), or (N, C) / (1, C) around a shift
        b = torch.zeros_like(a) if bias is None else bias.to(a.dtype).expand_as(a)
        y = kernels.affine(p.x, a, centre, b)
        ctx.mode, ctx.count, ctx.process_group = mode, g.count, process_group
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(p.x, weight, bias, g.mean, rstd, p.shift)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, weight, bias, mean, rstd, shift = ctx.saved_tensors
        c = x.shape[1]
        centre = _centre(mean, shift, _BATCH, c, ctx.mode)  # x_hat = (x - centre) * rstd
        if x.numel():
            s1, s2 = kernels.grad_sums(dy, x, centre)  # per (n, c): sum dy, sum dy * (x - centre)
            sums = torch.stack([s1.sum(0).to(rstd.dtype), (rstd * s2.sum(0).to(rstd.dtype))])  # dy, dy * x_hat
        else:  # an empty batch contributes nothing, but still joins the collective
            sums = torch.zeros(2, c, dtype=rstd.dtype, device=x.device)
        # this process's contributions (DDP reduces them); copies, since the all_reduce below works in place
        dweight = sums[1].to(weight.dtype, copy=True) if ctx.has_weight and ctx.needs_input_grad[1] else None
        dbias = sums[0].to(bias.dtype, copy=True) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if world_size(ctx.process_group) > 1:
                torch.distributed.all_reduce(sums, group=ctx.process_group)
            k1 = _with_weight(rstd, weight)
            k3 = -k1 * sums[0] / ctx.count  # through the mean
            k2 = None if ctx.mode == "mean" else -k1 * rstd * sums[1] / ctx.count  # through the variance
            dx = kernels.affine_grad(dy, x, k1, k2, centre, k3)
        return dx, dweight, dbias, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    mode: str = "standard",
    process_group: Any = None,
    *,
    prepared: Optional[kernels.Prepared] = None,
    moments: Optional[Moments] = None,
    name: str = "sync_batch_norm",
) -> Tuple[Tensor, Moments]:
    """Batch normalization of ``input`` ``(N, C, *S)`` with the statistics of every process's batch.

    ``mode="standard"``: ``y = weight (x - mu) / sqrt(var + eps) + bias`` with the global mean and biased
    variance; ``mode="mean"``: ``y = weight (x - mu) + bias`` (mean-only BN). Returns ``y`` and the global
    moments (Python ``int`` count) for the running-statistics update. ``weight``/``bias`` (``(C,)``) may be any
    autograd expressions; their gradients are this process's contributions (DDP reduces them). ``prepared``
    and ``moments`` come from :func:`global_batch_moments` when the caller needed the statistics first.
    Every process of the group must call it, with an empty batch if it has no data; fails on every process
    alike (``ValueError``, naming ``name``) when the whole group holds at most one value per channel.
    """
    if mode not in ("standard", "mean"):
        raise ValueError(f"{name}: mode must be 'standard' or 'mean', got {mode!r}")
    _checks.check_input(name, input, (2, 3, 4, 5), shape_hint="(N, C, *spatial)")
    _checks.check_eps(name, eps)
    c = input.shape[1]
    _checks.check_param(name, "weight", weight, (c,))
    _checks.check_param(name, "bias", bias, (c,))
    if prepared is not None and moments is None:
        raise ValueError(f"{name}: 'prepared' needs the matching 'moments' from global_batch_moments")
    if moments is None:
        prepared, moments = global_batch_moments(input, process_group)
    total = _int_count(moments.count)
    moments = Moments(total, moments.mean.double(), moments.m2.double())
    if total <= (0 if mode == "mean" else 1):
        raise ValueError(
            f"{name}: expected more than {0 if mode == 'mean' else 1} value(s) per channel over all "
            f"{world_size(process_group)} process(es) when training, got {total} (this process's input has "
            f"shape {tuple(input.shape)})"
        )
    y = _SyncBatchNormFn.apply(input, weight, bias, eps, mode, process_group, prepared, moments)
    return y, Moments(total, moments.mean, moments.m2)


@register("syncbn", "syncbatchnorm")
class SyncBatchNorm(_BatchNorm):
    """Batch Normalization with statistics over all processes of ``process_group`` (see the module doc).

    ``torch.nn.SyncBatchNorm``'s signature, state_dict keys and behaviour (a ``BatchNorm*d`` checkpoint
    loads into it and back), plus ``mean_only=True`` for synchronized mean-only BatchNorm. Input
    ``(N, C)`` or ``(N, C, *S)`` with up to 3 spatial dims, on any device and backend. Running statistics
    are updated from the global batch (unbiased variance over all processes' values), identically on every
    process. Use :func:`normzoo.tools.convert_sync` to convert a model's BatchNorm layers.
    """

    _input_dims = (2, 3, 4, 5)
    _shape_hint = "(N, C, *spatial)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None, *, bias: bool = True, mean_only: bool = False) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group
        self.mean_only = bool(mean_only)
        if self.mean_only:
            self._mode = "mean"  # the single-process path of _BatchNorm.forward

    def extra_repr(self) -> str:
        return super().extra_repr() + (", mean_only=True" if self.mean_only else "")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size(self.process_group) == 1:
            return super().forward(input)
        x = self._check_input(input)
        factor = self._momentum_factor(self.num_batches_tracked)
        y, batch = sync_batch_norm(x, self.weight, self.bias, self.eps, "mean" if self.mean_only else "standard",
                                   self.process_group, name=type(self).__name__)
        if self.track_running_stats:
            F.update_running_stats(self.running_mean, self.running_var, batch, factor)
        return y


@register("syncmbn", "sync_meanonly_bn")
def _make_sync_mean_only(num_features: int, **kwargs: Any) -> SyncBatchNorm:
    return SyncBatchNorm(num_features, mean_only=True, **kwargs)


__all__ = ["SyncBatchNorm", "sync_batch_norm", "global_batch_moments", "all_gather_moments", "world_size"]
