"""Straightforward implementations of the papers' formulas: the benchmark's baseline where torch has no layer.

Each module is the paper's equation written in plain ``torch`` ops and left to autograd, the way a
practitioner would first type it: one op per symbol, statistics in the input's dtype, every intermediate
saved by autograd. They exist so that ``normzoo bench`` can say how much normzoo's fused version buys;
they are not part of the library and are only as careful as a first implementation (no input checks).

Input ``x`` is ``(N, C, *S)`` (``S`` may be empty); "batch" statistics reduce over ``(N, *S)`` per channel,
"instance" statistics over ``S`` per (sample, channel). Variances are biased (divide by the count) in
the normalization, as in every paper below; running variances use the unbiased estimate (torch's rule).
Parameters: ``weight`` (gamma, ones) and ``bias`` (beta, zeros) of shape ``(C,)`` plus the method's own.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor


def _spatial(x: Tensor) -> Tuple[int, ...]:
    return tuple(range(2, x.dim()))


def _batch_dims(x: Tensor) -> Tuple[int, ...]:
    return (0,) + _spatial(x)


def _moments(x: Tensor, dims: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept), with the one-call idiom ``torch.var_mean``."""
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    return mean, var


def _channel(t: Tensor, x: Tensor) -> Tensor:
    """View a ``(C,)`` tensor so that it broadcasts over ``(N, C, *S)``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


class _Formula(nn.Module):
    """Shared parts: per-channel ``weight``/``bias``, optional running statistics over the batch."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, running: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if running:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

    def affine(self, x_hat: Tensor) -> Tensor:
        return x_hat * _channel(self.weight, x_hat) + _channel(self.bias, x_hat)

    @torch.no_grad()
    def update_running(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        """``running = (1 - momentum) running + momentum batch``, variance made unbiased by ``m / (m - 1)``."""
        m = x.numel() // x.shape[1]
        self.running_mean.lerp_(mean.reshape(-1).to(self.running_mean.dtype), self.momentum)
        unbiased = var.reshape(-1) * (m / max(m - 1, 1))
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)

    def batch_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Training: batch mean and biased variance (and the running update); eval: the running statistics."""
        if self.training:
            mean, var = _moments(x, _batch_dims(x))
            self.update_running(x, mean, var)
            return mean, var
        return _channel(self.running_mean, x), _channel(self.running_var, x)


class MeanOnlyBatchNormFormula(_Formula):
    """Mean-only BatchNorm (Salimans & Kingma 2016, sec. 4): ``y = gamma (x - mu_B) + beta``.

    (The paper has the bias only; ``gamma`` is kept to match normzoo's ``affine=True`` layer.)
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.mean(_batch_dims(x), keepdim=True)
            with torch.no_grad():
                self.running_mean.lerp_(mean.reshape(-1).to(self.running_mean.dtype), self.momentum)
        else:
            mean = _channel(self.running_mean, x)
        return self.affine(x - mean)


class BatchRenormFormula(_Formula):
    """Batch Renormalization (Ioffe 2017, Algorithm 1).

    ``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var + eps)``,
    ``r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))``,
    ``d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max, d_max))``,
    ``y = gamma ((x - mu_B) / sigma_B * r + d) + beta``; eval: ``gamma (x - mu) / sigma + beta``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, r_max: float = 3.0,
                 d_max: float = 5.0) -> None:
        super().__init__(num_features, eps, momentum)
        self.r_max, self.d_max = r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            mean, var = self.batch_stats(x)
            return self.affine((x - mean) / torch.sqrt(var + self.eps))
        mean, var = _moments(x, _batch_dims(x))
        sigma_b = torch.sqrt(var + self.eps)
        with torch.no_grad():
            sigma = torch.sqrt(_channel(self.running_var, x) + self.eps)
            r = (sigma_b / sigma).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - _channel(self.running_mean, x)) / sigma).clamp(-self.d_max, self.d_max)
        self.update_running(x, mean.detach(), var.detach())
        return self.affine((x - mean) / sigma_b * r + d)


class BatchInstanceNormFormula(_Formula):
    """Batch-Instance Normalization (Nam & Kim 2018): ``y = (rho x_B + (1 - rho) x_I) gamma + beta``.

    ``x_B`` is ``x`` normalized with batch statistics, ``x_I`` with instance statistics, and ``rho`` a
    per-channel parameter kept in ``[0, 1]`` (clipped in the forward pass here; the paper clips after
    each update), initialised to 1 (BatchNorm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.rho = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        b_mean, b_var = self.batch_stats(x)
        x_b = (x - b_mean) / torch.sqrt(b_var + self.eps)
        i_mean, i_var = _moments(x, _spatial(x))
        x_i = (x - i_mean) / torch.sqrt(i_var + self.eps)
        rho = _channel(self.rho.clamp(0.0, 1.0), x)
        return self.affine(rho * x_b + (1.0 - rho) * x_i)


class SwitchableNormFormula(_Formula):
    """Switchable Normalization (Luo et al. 2019), training statistics as the paper's Eq. (4)-(5).

    Instance moments ``mu_I, var_I`` over ``S``; layer moments from them, ``mu_L = mean_c mu_I``,
    ``var_L = mean_c (var_I + mu_I^2) - mu_L^2``; batch moments likewise over ``n``. Then
    ``mu = sum_k softmax(mean_weight)_k mu_k``, ``var = sum_k softmax(var_weight)_k var_k`` (k in IN, LN, BN)
    and ``y = gamma (x - mu) / sqrt(var + eps) + beta``. Eval uses the running BN moments in the BN slot.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        mean_in, var_in = _moments(x, _spatial(x))
        second = var_in + mean_in ** 2
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second.mean(1, keepdim=True) - mean_ln ** 2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn ** 2
            self.update_running(x, mean_bn.detach(), var_bn.detach())
        else:
            mean_bn, var_bn = _channel(self.running_mean, x), _channel(self.running_var, x)
        wm = torch.softmax(self.mean_weight, 0)
        wv = torch.softmax(self.var_weight, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        return self.affine((x - mean) / torch.sqrt(var + self.eps))


class CrossIterationBatchNormFormula(_Formula):
    """Cross-Iteration BatchNorm (Yao et al. 2021, Eq. 8-9) over a window of the last ``window`` iterations.

    ``mu_bar = mean_tau mu_{t-tau}``, ``nu_bar = mean_tau max(nu_{t-tau}, mu_{t-tau}^2)`` with
    ``nu = E[x^2]`` per channel, ``var = max(nu_bar - mu_bar^2, 0)``,
    ``y = gamma (x - mu_bar) / sqrt(var + eps) + beta``; past statistics are constants (detached).
    The paper's Taylor compensation of past statistics needs the preceding layer's weight gradients;
    this baseline, like a layer that only sees its input, leaves it out.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, window: int = 8) -> None:
        super().__init__(num_features, eps, momentum)
        self.window = window
        self.register_buffer("past_mean", torch.zeros(max(window - 1, 0), num_features))
        self.register_buffer("past_sq", torch.zeros(max(window - 1, 0), num_features))
        self.filled = 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            mean, var = self.batch_stats(x)
            return self.affine((x - mean) / torch.sqrt(var + self.eps))
        mean_t = x.mean(_batch_dims(x))
        sq_t = (x * x).mean(_batch_dims(x))
        k = self.filled
        means = torch.cat([mean_t[None], self.past_mean[:k].to(x.dtype)])
        sqs = torch.cat([sq_t[None], self.past_sq[:k].to(x.dtype)])
        mean = means.mean(0)
        var = (torch.maximum(sqs, means ** 2).mean(0) - mean ** 2).clamp_min(0.0)
        with torch.no_grad():
            if self.past_mean.shape[0]:
                self.past_mean.copy_(torch.cat([mean_t[None].to(self.past_mean.dtype), self.past_mean[:-1]]))
                self.past_sq.copy_(torch.cat([sq_t[None].to(self.past_sq.dtype), self.past_sq[:-1]]))
                self.filled = min(k + 1, self.past_mean.shape[0])
        self.update_running(x, mean.detach(), var.detach())
        return self.affine((x - _channel(mean, x)) / torch.sqrt(_channel(var, x) + self.eps))


class FilterResponseNormFormula(_Formula):
    """Filter Response Normalization with TLU (Singh & Krishnan 2020).

    ``nu2 = mean_S x^2``, ``x_hat = x / sqrt(nu2 + eps)``, ``y = max(gamma x_hat + beta, tau)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__(num_features, eps, running=False)
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        nu2 = (x * x).mean(_spatial(x), keepdim=True)
        x_hat = x / torch.sqrt(nu2 + self.eps)
        return torch.maximum(self.affine(x_hat), _channel(self.tau, x))


class EvoNormB0Formula(_Formula):
    """EvoNorm-B0 (Liu et al. 2020): ``y = x / max(sqrt(var_B + eps), v1 x + sqrt(var_I + eps)) gamma + beta``.

    ``var_B``: batch variance per channel in training (running variance in eval), ``var_I``: instance
    variance; ``v1`` per channel, initialised to 1.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.v1 = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        _, var_b = self.batch_stats(x)
        _, var_i = _moments(x, _spatial(x))
        den = torch.maximum(torch.sqrt(var_b + self.eps), _channel(self.v1, x) * x + torch.sqrt(var_i + self.eps))
        return self.affine(x / den)


class EvoNormS0Formula(_Formula):
    """EvoNorm-S0 (Liu et al. 2020): ``y = x sigmoid(v1 x) / sqrt(var_G + eps) gamma + beta``.

    ``var_G``: variance per sample over each group of ``C / groups`` consecutive channels and ``S``.
    """

    def __init__(self, num_features: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps, running=False)
        self.groups = groups
        self.v1 = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        xg = x.reshape(n, self.groups, -1)
        _, var_g = _moments(xg, (2,))
        std = torch.sqrt(var_g + self.eps).repeat_interleave(c // self.groups, dim=1)
        std = std.view((n, c) + (1,) * (x.dim() - 2))
        return self.affine(x * torch.sigmoid(_channel(self.v1, x) * x) / std)


__all__ = ["MeanOnlyBatchNormFormula", "BatchRenormFormula", "BatchInstanceNormFormula", "SwitchableNormFormula",
           "CrossIterationBatchNormFormula", "FilterResponseNormFormula", "EvoNormB0Formula", "EvoNormS0Formula"]
