"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan 2019/2020).

For each sample ``n`` and channel ``c`` of ``x`` of shape ``(N, C, *S)``, with ``|S|`` spatial positions:

    nu2 = (1/|S|) sum_S x^2                       (mean square, no mean subtraction)
    y   = gamma * x / sqrt(nu2 + eps) + beta
    z   = max(y, tau)                             (TLU, a ReLU with a learned threshold)

FRN uses no batch statistics at all (train and eval are the same computation), and because it does not
centre ``x``, the TLU's learned ``tau`` replaces ReLU's fixed 0 threshold: ``max(y, tau) = ReLU(y - tau) + tau``.

**epsilon.** The paper adds ``eps`` *inside* the square root, to the mean square, as here. Its learned-eps
variant (recommended for fully connected layers and 1x1 feature maps) uses ``eps = eps0 + |eps_l|`` with a
fixed floor ``eps0`` (default 1e-6) and a learned ``eps_l`` (initialised to 1e-4). Code that learns
``|eps_l|`` alone (several public ports) can drive ``eps`` to 0 and produce ``0 / 0 = NaN`` for an
all-zero channel; the floor here rules that out.

**1x1 input.** With one spatial position, ``nu2 = x^2`` and ``x / sqrt(x^2 + eps) ~ sign(x)``: the layer
loses the magnitude of ``x`` and its gradient spikes to ``1/sqrt(eps)`` near ``x = 0``, which makes
training unstable (the instability reported for the official code on fully connected layers). normzoo
keeps the paper's formula and, when the input has a single spatial position and ``eps`` is a fixed
small constant (``learnable_eps=False`` and ``eps < 1e-3``), emits a ``UserWarning`` recommending
``learnable_eps=True`` (the paper's remedy) or a larger ``eps``; it never changes ``eps`` silently.

Statistics are accumulated in float32 for low-precision input (float64 for float64).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from normzoo import _checks, kernels, native, native_ops
from normzoo._autograd import grad_as, lean_apply, once_differentiable
from normzoo.registry import register

#: Below this fixed eps, a 1x1 input triggers the warning described in the module doc.
SMALL_EPS_1X1 = 1e-3


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """``(C,)`` -> ``(1, C, 1, ...)`` broadcastable against ``x`` of shape ``(N, C, *S)``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def filter_response_norm(
    input: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    tau: Optional[Tensor] = None,
    eps: Union[float, Tensor] = 1e-6,
) -> Tensor:
    r"""Filter Response Normalization, optionally followed by the TLU.

    ``z = max(gamma * x / sqrt(nu2 + eps) + beta, tau)`` with ``nu2`` the mean of ``x^2`` over the spatial
    dims, per sample and channel (see the module doc).

    Args:
        input: ``(N, C, *S)``, any number of spatial dims (none: ``nu2 = x^2``, the 1x1 case).
        weight, bias: ``gamma``, ``beta`` of shape ``(C,)`` or None (1 and 0).
        tau: the TLU threshold, shape ``(C,)``; None for FRN without TLU.
        eps: a positive float, or a tensor (0-dim or ``(C,)``) for a learned epsilon (the caller keeps
            it positive, e.g. ``eps0 + |eps_l|``).

    Returns:
        A tensor of ``input``'s shape and dtype.
    """
    name = "filter_response_norm"
    _checks.check_input(name, input, range(2, 8), shape_hint="(N, C, *spatial)")
    return _filter_response_norm_checked_input(name, input, weight, bias, tau, eps)


def _filter_response_norm_checked_input(name: str, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                        tau: Optional[Tensor], eps: Union[float, Tensor]) -> Tensor:
    """:func:`filter_response_norm` of an input whose rank, dtype (and channels) the caller has checked; the rest
    is checked here, with ``name`` in the errors. A float ``eps`` goes to the op as it is (no tensor made)."""
    c = input.shape[1]
    _checks.check_channel_params(name, c, weight=weight, bias=bias, tau=tau)
    if isinstance(eps, Tensor):
        if eps.numel() not in (1, c):
            raise ValueError(f"{name}: a tensor eps must have 1 or {c} elements, got shape {tuple(eps.shape)}")
    else:
        _checks.check_eps(name, eps)
        eps = float(eps)
    learned = isinstance(eps, Tensor)
    lay = native.supported_layout(input) if input.dim() > 2 and (not learned or eps.numel() == 1) else None
    compiled = native_ops.ops() if lay is not None else None
    if compiled is not None:  # the fused path below with its autograd in C++
        native.wake_workers(input)
        value = float(eps.detach()) if learned else eps
        return compiled.filter_response_norm(input, weight, bias, tau, eps if learned else None, value, lay)
    return _frn_apply(input, weight, bias, tau, eps)


class _FilterResponseFn(torch.autograd.Function):
    """FRN (+ TLU) as one op on the statistics core. With ``rstd = (nu2 + eps)^-1/2`` per (n, c):

        y  = gamma * rstd * x + beta,      z = max(y, tau)
        dy = dz * [y >= tau],              dtau = sum dz * [y < tau]
        dx = gamma rstd dy - gamma rstd^3 x (1/L) sum_S dy x
        dgamma = sum rstd dy x,  dbeta = sum dy,  deps = -1/2 sum gamma rstd^3 sum_S dy x

    Ties (``y == tau``, e.g. a zero input with ``beta = tau = 0``, the initial values) pass the gradient to
    ``y``, as the authors' TensorFlow code does (``tf.maximum`` sends ties to its first argument);
    ``torch.maximum`` would split it in halves.

    With the native kernels (CPU, spatial dims, a scalar ``eps``) this is InstanceNorm's fused kernel in its
    RMS mode with the TLU inside: one read of ``x`` and one write forward, the mask recomputed in the fused
    backward. Saved for backward: ``x`` and the float64 ``(N, C)`` statistics; ``y`` and the TLU mask are
    recomputed from them.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], tau: Optional[Tensor],
                eps: Union[float, Tensor]) -> Tensor:
        n, c = x.shape[:2]
        learned = isinstance(eps, Tensor)  # a float eps has no gradient: ctx.needs_input_grad[4] is False
        ctx.eps_shape, ctx.eps_dtype = (eps.shape, eps.dtype) if learned else ((), None)
        ctx.fused = x.dim() > 2 and (not learned or eps.numel() == 1) and native.supports(x)
        if ctx.fused:
            native.wake_workers(x)
            y, stats = native.group_forward(x, c, weight, bias, float(eps), "rms", tau)
            ctx.save_for_backward(x, weight, bias, tau, stats)
            return y
        rows = kernels.prepare(x).rows  # per (n, c): exact mean and M2 over the spatial dims
        nu2 = rows.var(0) + rows.mean.square()
        eps_nc = (eps.detach().to(nu2.dtype).reshape(-1).expand(c) if learned
                  else torch.full((c,), eps, dtype=nu2.dtype))
        rstd = torch.rsqrt(nu2 + eps_nc)
        y = _pre_tlu(x, rstd, weight, bias)
        if tau is not None:
            torch.maximum(y, _per_channel(tau.detach(), y).to(y.dtype), out=y)
        ctx.save_for_backward(x, weight, bias, tau, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dz: Tensor):  # type: ignore[override]
        x, weight, bias, tau, saved = ctx.saved_tensors  # fused: group_forward's statistics block; else rstd (N, C)
        want = ctx.needs_input_grad
        if ctx.fused:
            native.wake_workers(x)
            g = native.group_backward(dz, x, x.shape[1], weight, saved, "rms", weight is not None and want[1],
                                      bias is not None and want[2], bias=bias, tau=tau,
                                      dtau=tau is not None and want[3], drstd=want[4])
            deps = None if g.drstd is None else (-0.5 * g.drstd * saved[2].pow(3)).sum().reshape(ctx.eps_shape).to(
                ctx.eps_dtype)
            return g.dx, grad_as(g.dgamma, weight), grad_as(g.dbeta, bias), grad_as(g.dtau, tau), deps
        rstd = saved
        dtau = None
        if tau is not None:
            above = _pre_tlu(x, rstd, weight, bias) >= _per_channel(tau, x).to(x.dtype)
            dy = torch.where(above, dz, torch.zeros((), dtype=dz.dtype))
            if ctx.needs_input_grad[3]:
                dtau = (dz - dy).sum([0] + list(range(2, dz.dim())), dtype=rstd.dtype).to(tau.dtype)
        else:
            dy = dz
        zero = torch.zeros_like(rstd)
        s1, s2 = kernels.grad_sums(dy, x, zero)  # per (n, c): sum dy, sum dy x
        gamma = weight.to(rstd.dtype) if weight is not None else torch.ones_like(rstd[0])
        length = x.numel() // (x.shape[0] * x.shape[1])
        drstd = gamma * s2  # dL/drstd per (n, c)
        dx = kernels.affine_grad(dy, x, gamma * rstd, -gamma * rstd.pow(3) * s2 / length, zero, zero)
        dweight = (rstd * s2).sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = s1.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        deps = None
        if ctx.needs_input_grad[4]:
            per_nc = -0.5 * drstd * rstd.pow(3)
            deps = (per_nc.sum() if len(ctx.eps_shape) == 0 or int(torch.Size(ctx.eps_shape).numel()) == 1
                    else per_nc.sum(0)).reshape(ctx.eps_shape)
        return dx, dweight, dbias, dtau, deps


_frn_apply = lean_apply(_FilterResponseFn)


def _pre_tlu(x: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``gamma * rstd * x + beta`` per (n, c), in ``x``'s dtype and layout."""
    a = rstd if weight is None else rstd * weight.detach().to(rstd.dtype)
    b = torch.zeros_like(a) if bias is None else bias.detach().to(a.dtype).expand_as(a)
    return kernels.affine(x, a, torch.zeros_like(a), b)


def tlu(input: Tensor, tau: Tensor) -> Tensor:
    """Thresholded Linear Unit ``max(x, tau)`` with a per-channel ``tau`` of shape ``(C,)``."""
    _checks.check_input("tlu", input, range(2, 8), shape_hint="(N, C, *spatial)")
    _checks.check_param("tlu", "tau", tau, (input.shape[1],))
    return torch.maximum(input, _per_channel(tau, input).to(input.dtype))


class _FilterResponseNorm(nn.Module):
    r"""Filter Response Normalization with the TLU (Singh & Krishnan), per sample and channel.

    ``z = max(gamma * x / sqrt(nu2 + eps) + beta, tau)``, ``nu2 = mean over space of x^2`` (see
    :mod:`normzoo.nn.response` for the equations, the epsilon conventions and the 1x1 case).

    Args:
        num_features: ``C``.
        eps: the fixed epsilon (> 0); with ``learnable_eps`` it is the floor ``eps0`` of
            ``eps = eps0 + |eps_l|``.
        affine: learn ``weight`` (gamma, init 1) and ``bias`` (beta, init 0) of shape ``(C,)``.
        tlu: apply the TLU with a learned ``tau`` (shape ``(C,)``, init 0). ``tlu=False`` gives plain FRN
            (then follow it with an activation of your choice).
        learnable_eps: learn a scalar ``eps_l`` (parameter ``learned_eps``), as the paper recommends for
            1x1 feature maps and fully connected layers.
        eps_init: the initial ``eps_l``.

    Train and eval compute the same thing (no running statistics). Shapes: see the subclasses; the
    output has the input's shape and dtype.
    """

    _input_dims: Tuple[int, ...] = ()
    _shape_hint = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        affine: bool = True,
        tlu: bool = True,
        learnable_eps: bool = False,
        eps_init: float = 1e-4,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        name = type(self).__name__
        _checks.check_positive_int(name, "num_features", num_features)
        _checks.check_eps(name, eps)
        if learnable_eps and (isinstance(eps_init, bool) or not isinstance(eps_init, (int, float)) or eps_init < 0):
            raise ValueError(f"{name}: eps_init must be a number >= 0, got {eps_init!r}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine, self.tlu = num_features, eps, affine, tlu
        self.learnable_eps, self.eps_init = learnable_eps, eps_init
        for pname, shape, wanted in (("weight", (num_features,), affine), ("bias", (num_features,), affine),
                                     ("tau", (num_features,), tlu), ("learned_eps", (), learnable_eps)):
            self.register_parameter(pname, nn.Parameter(torch.empty(shape, **factory)) if wanted else None)
        self.weight: Optional[Tensor]
        self.bias: Optional[Tensor]
        self.tau: Optional[Tensor]
        self.learned_eps: Optional[Tensor]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` = 1, ``bias`` = 0, ``tau`` = 0, ``learned_eps`` = ``eps_init``."""
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()  # type: ignore[union-attr]
            if self.tau is not None:
                self.tau.zero_()
            if self.learned_eps is not None:
                self.learned_eps.fill_(self.eps_init)

    def effective_eps(self) -> Union[float, Tensor]:
        """The epsilon in use: ``eps``, or ``eps + |learned_eps|`` (a tensor) with ``learnable_eps``."""
        if self.learned_eps is None:
            return self.eps
        return self.eps + self.learned_eps.abs()

    def forward(self, input: Tensor) -> Tensor:
        x = _checks.check_input(type(self).__name__, input, self._input_dims, self.num_features, self._shape_hint)
        if self.learned_eps is None and self.eps < SMALL_EPS_1X1 and x.shape[2:].numel() == 1:
            warnings.warn(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} has a single spatial position, where "
                f"FRN computes x / sqrt(x^2 + eps) ~ sign(x) and its gradient peaks at 1/sqrt(eps) (eps={self.eps}); "
                "use learnable_eps=True as the FRN paper recommends for 1x1 maps, or a larger eps",
                UserWarning,
                stacklevel=2,
            )
        return _filter_response_norm_checked_input("filter_response_norm", x, self.weight, self.bias, self.tau,
                                                   self.effective_eps())

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, affine={self.affine}, tlu={self.tlu}"
        if self.learnable_eps:
            s += f", learnable_eps=True, eps_init={self.eps_init}"
        return s


@register("frn1d", "filterresponsenorm1d")
class FilterResponseNorm1d(_FilterResponseNorm):
    __doc__ = _FilterResponseNorm.__doc__
    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


@register("frn", "frn2d", "filterresponsenorm2d")
class FilterResponseNorm2d(_FilterResponseNorm):
    __doc__ = _FilterResponseNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


@register("frn3d", "filterresponsenorm3d")
class FilterResponseNorm3d(_FilterResponseNorm):
    __doc__ = _FilterResponseNorm.__doc__
    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


#: Short name for the 2d layer, as in the paper's figures.
FRN = FilterResponseNorm2d


class TLU(nn.Module):
    """Thresholded Linear Unit ``z = max(x, tau)``, per channel, ``tau`` learned (init 0), for ``(N, C, *S)``.

    The activation of FRN as a separate module (for a ``FilterResponseNorm*(..., tlu=False)`` followed by
    something else in between).
    """

    def __init__(self, num_features: int, device: Any = None, dtype: Any = None) -> None:
        _checks.check_positive_int("TLU", "num_features", num_features)
        super().__init__()
        self.num_features = num_features
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.tau.zero_()

    def forward(self, input: Tensor) -> Tensor:
        _checks.check_input("TLU", input, range(2, 8), self.num_features, "(N, C, *spatial)")
        return tlu(input, self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


__all__ = [
    "filter_response_norm",
    "tlu",
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "FRN",
    "TLU",
]
