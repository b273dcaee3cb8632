"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang & Lin 2021): BN statistics over the last k iterations.

With small batches the batch statistics are noisy. CBN pools the statistics of the current iteration ``t``
and the ``k - 1`` before it. Those were computed with older weights ``theta_{t-tau}`` of the preceding layer,
so each is *compensated* to the current weights with the paper's first-order Taylor term::

    mu_{t-tau}(theta_t) ~ mu_{t-tau}(theta_{t-tau}) + d mu_{t-tau} / d theta . (theta_t - theta_{t-tau})
    nu_{t-tau}(theta_t) ~ nu_{t-tau}(theta_{t-tau}) + d nu_{t-tau} / d theta . (theta_t - theta_{t-tau})

(``nu = E[y^2]``, per output channel ``j`` of the preceding layer ``y = W x + b``), and then, as in the paper,
``nu_bar = mean_tau max(nu_tau, mu_tau^2)``, ``mu_bar = mean_tau mu_tau``, ``var_bar = nu_bar - mu_bar^2``,
``y = gamma (x - mu_bar) / sqrt(var_bar + eps) + beta``. Only the current iteration's statistics carry a
gradient (the compensated past ones are constants, as in the paper and the official code).

How normzoo computes it (same result, better numerics and cost):

- **Per-iteration moments, merged exactly.** Each past iteration is stored as ``(count, mu, var)`` and the
  paper's max becomes ``var_tau = max(nu_tau - mu_tau^2, 0)``; the k iterations are merged with Chan's
  formula (:mod:`normzoo.stats`), which equals the paper's average for equal batch sizes and weights
  iterations by their element count otherwise. With ``P = d mu_j / d W_j`` and ``G = d var_j / d W_j``
  the compensated variance is ``var + G . dW - (P . dW)^2``, algebraically the paper's
  ``nu + (d nu/dW) . dW - mu(theta_t)^2`` without the cancellation of ``E[y^2] - E[y]^2``. (Its error is
  ``dW' E[x~ x~'] dW``, second order in the weight change; a first-order Taylor term on the variance itself
  would err by ``dW' Cov(x~) dW`` only. normzoo follows the paper.)
- **Analytic derivatives** (:func:`batch_moment_grads`): for ``y = W x + b`` (Linear, or a convolution
  with ``x`` read as patches ``x~``), ``d mu_j / d W_j = mean(x~)`` -- the same for every output channel of
  a group, stored compactly -- and ``d var_j / d W_j = (2/m) sum (y_j - mu_j) x~``, one weight-gradient-
  shaped reduction (the cost of a convolution's weight gradient), not two autograd passes through the
  layer as in the official code. ``mu`` is linear in ``W``, so its compensation is exact. A bias of the
  preceding layer shifts ``mu`` exactly and leaves the variance alone (the paper compensates the weights
  only; its layers have no bias).
- **Storage.** ``P . W_tau`` and ``G . W_tau`` are kept per channel instead of the old weights, so a past
  iteration costs one weight-sized tensor (``G``) plus ``O(C)``; all of it lives in registered buffers
  (``window_*``, ``iteration``): it follows ``.to()``, and is saved and loaded with the ``state_dict``
  (the official code keeps Python lists, lost on save, and hard-codes CUDA).
- **Burn-in.** The first ``burn_in`` training iterations are plain BatchNorm (the paper's burn-in: early in
  training the weights move too fast for the Taylor term); the statistics of the last ``window - 1`` of
  them are recorded so the window is full when it starts.
- **Running statistics** are updated with the current batch's statistics exactly as BatchNorm's (eval uses
  them), so ``window=1`` is BatchNorm exactly and a BatchNorm checkpoint loads with ``strict=False``.
- epsilon is inside the square root (the official code adds it to the standard deviation).

Using it: the layer needs the preceding layer (a ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` whose output
it receives directly)::

    conv = nn.Conv2d(64, 128, 3, padding=1, bias=False)
    cbn = CrossIterationBatchNorm2d(128, window=4, burn_in=1000).attach(conv)
    out = cbn(conv(x))

``attach`` registers a forward hook on ``conv`` that hands its input and output to the CBN layer (no copy).
``compensate=False`` gives the naive windowed statistics (no preceding layer needed), the paper's ablation.
After each training step, :attr:`last_window` holds the per-iteration statistics used (compensated and as
recorded) for measuring the compensation error.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from normzoo import _checks, native, native_ops, native_window
from normzoo.channel_norm import Policy, channel_norm, fixed_affine
from normzoo.nn._base import NormBase
from normzoo.registry import register
from normzoo.running import Running, count_batch_
from normzoo.stats import Moments, accumulation_dtype

_Layer = Union[nn.Linear, nn.Conv1d, nn.Conv2d]


class WindowStats(NamedTuple):
    """The statistics behind one training step of a Cross-Iteration BN layer (all detached).

    Per iteration (dim 0: the current one first, then the past ones from newest to oldest; ``count == 0``
    marks an empty slot): ``count`` ``(k,)``, ``mean``/``var`` ``(k, C)`` compensated to the current weights,
    ``raw_mean``/``raw_var`` as recorded with the weights of their time. ``window_mean``/``window_var``
    ``(C,)``: the merged statistics the layer normalized with.
    """

    count: Tensor
    mean: Tensor
    var: Tensor
    raw_mean: Tensor
    raw_var: Tensor
    window_mean: Tensor
    window_var: Tensor


def _conv_input(layer: nn.Module, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    """``(x', padding)`` with ``conv(x', W, padding=padding)`` equal to ``layer(x)`` (explicit zero padding)."""
    dims = x.dim() - 2
    pad = layer.padding
    if isinstance(pad, str):
        if pad == "valid":
            return x, (0,) * dims
        # "same": total padding dilation * (kernel - 1) per dim, the odd element on the right (as torch)
        spec: List[int] = []
        for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size)):
            total = d * (k - 1)
            spec += [total // 2, total - total // 2]
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return TF.pad(x, spec, mode=mode), (0,) * dims
    if layer.padding_mode != "zeros":
        return TF.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0,) * dims
    return x, tuple(pad)


def batch_moment_grads(layer: _Layer, input: Tensor, output: Tensor, mean: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor]:
    """Derivatives of the per-channel batch mean and (biased) variance of ``output = layer(input)`` w.r.t. its weight.

    For output channel ``j`` with weights ``W_j`` (flattened to ``F = in_channels / groups * prod(kernel)``)
    and ``m`` output elements per channel, reading the input as patches ``x~`` (Linear: the input rows)::

        d mu_j  / d W_j = (1/m) sum x~                  (the same for all channels of a group)
        d var_j / d W_j = (2/m) sum (y_j - mu_j) x~

    Returns ``(dmean, dvar)``: ``dmean`` of shape ``(groups, F)`` and ``dvar`` of shape ``(C_out, F)``, in the
    accumulation dtype. ``mean``: the per-channel mean of ``output`` if already known. Supported layers:
    ``nn.Linear`` on ``(N, F)`` input, ``nn.Conv1d``, ``nn.Conv2d`` (any stride, padding, padding mode,
    dilation, groups).
    """
    acc = accumulation_dtype(output.dtype)
    x, y = input.detach(), output.detach()
    dims = [0] + list(range(2, y.dim()))
    m = y.numel() // y.shape[1]
    if mean is None:
        mean = y.mean(dims, dtype=acc)
    mean_b = mean.to(y.dtype).view((1, -1) + (1,) * (y.dim() - 2))
    if isinstance(layer, nn.Linear):
        if x.dim() != 2:
            raise ValueError(f"batch_moment_grads: a Linear layer's input must be (N, F), got {tuple(x.shape)}")
        centred = (y - mean_b).to(acc).mul_(2.0 / m)
        return x.mean(0, keepdim=True, dtype=acc), centred.t() @ x.to(acc)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        grad_weight = torch.nn.grad.conv1d_weight if isinstance(layer, nn.Conv1d) else torch.nn.grad.conv2d_weight
        xp, padding = _conv_input(layer, x)
        groups, c_out = layer.groups, layer.out_channels
        kw = dict(stride=layer.stride, padding=padding, dilation=layer.dilation, groups=groups)
        spatial = tuple(y.shape[2:])
        if groups == 1:  # one weight-gradient pass for both: an extra output channel of constant 1/m gives P
            go = torch.empty((y.shape[0], c_out + 1) + spatial, dtype=xp.dtype, device=xp.device)
            torch.add(mean_b * (-2.0 / m), y, alpha=2.0 / m, out=go[:, :c_out])  # (2/m)(y - mu), one pass
            go[:, c_out].fill_(1.0 / m)
            both = grad_weight(xp, (c_out + 1,) + tuple(layer.weight.shape[1:]), go, **kw).reshape(c_out + 1, -1)
            both = both.to(acc)
            return both[c_out:], both[:c_out]
        centred = (y - mean_b).mul_(2.0 / m)
        ones = torch.full((1, groups) + spatial, 1.0 / m, dtype=xp.dtype, device=xp.device)
        shape_p = (groups, layer.in_channels // groups) + tuple(layer.kernel_size)
        dmean = grad_weight(xp.sum(0, keepdim=True), shape_p, ones, **kw).reshape(groups, -1).to(acc)
        dvar = grad_weight(xp, tuple(layer.weight.shape), centred.to(xp.dtype), **kw).reshape(c_out, -1).to(acc)
        return dmean, dvar
    raise TypeError(f"batch_moment_grads: expected nn.Linear, nn.Conv1d or nn.Conv2d, got {type(layer).__name__}")


def _weight_dots(layer: _Layer, dmean: Tensor, dvar: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel ``dmean . W_j`` and ``dvar_j . W_j`` for ``dmean`` ``(..., G, F)``, ``dvar`` ``(..., C, F)``."""
    w = layer.weight.detach().to(dvar.dtype)
    c, groups = w.shape[0], dmean.shape[-2]
    wf = w.reshape(c, -1)
    pw = torch.einsum("...gf,gof->...go", dmean, wf.view(groups, c // groups, -1)).flatten(-2)
    gw = torch.einsum("...of,of->...o", dvar, wf)
    return pw, gw


class _CrossIterationBatchNorm(NormBase):
    """Cross-Iteration Batch Normalization (Yao et al. 2021): BatchNorm over the last ``window`` iterations,
    compensated for the weight change of the preceding layer (see :mod:`normzoo.nn.cross_iteration`).

    Args (beyond BatchNorm's, keyword-only):
        window: ``k``, the number of iterations pooled (current included); 1 is BatchNorm.
        burn_in: training iterations of plain BatchNorm before the window is used.
        compensate: apply the Taylor compensation (needs :meth:`attach`); False gives naive windowed
            statistics. Changing it clears the stored iterations.

    Buffers (in the ``state_dict``, following ``.to()``): BatchNorm's, plus ``iteration`` (training steps
    seen) and the per-iteration window ``window_count``, ``window_mean``, ``window_var``, ``window_dmean``,
    ``window_dvar``, ``window_wmean``, ``window_wvar``, ``window_bias``. Eval: the running statistics. Only
    the current iteration's statistics receive gradients.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *, bias: bool = True,
                 window: int = 4, burn_in: int = 0, compensate: bool = True) -> None:
        name = type(self).__name__
        _checks.check_positive_int(name, "window", window)
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"{name}: burn_in must be a non-negative int, got {burn_in!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.window, self.burn_in = window, burn_in
        self._compensate = bool(compensate)
        acc = accumulation_dtype(dtype if dtype is not None else torch.get_default_dtype())
        factory = {"device": device, "dtype": acc}
        k, c = window - 1, num_features
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("window_count", torch.zeros(k, **factory))
        for name_ in ("window_mean", "window_var", "window_wmean", "window_wvar", "window_bias"):
            self.register_buffer(name_, torch.zeros(k, c, **factory))
        # shaped by the preceding layer's weight on attach() (or by a loaded state_dict)
        self.register_buffer("window_dmean", torch.zeros(k, 1, 0, **factory))
        self.register_buffer("window_dvar", torch.zeros(k, c, 0, **factory))
        self.__dict__["_layer"] = None  # the preceding layer: not a submodule (it belongs to the model)
        self._hook: Any = None
        self._captured: Optional[Tuple[Tensor, Tensor]] = None
        self._window_parts: Any = None  # what last_window is built from (see forward), or the built one

    # -- state ------------------------------------------------------------------------------------
    @property
    def compensate(self) -> bool:
        return self._compensate

    @compensate.setter
    def compensate(self, value: bool) -> None:
        if bool(value) != self._compensate:
            self._compensate = bool(value)
            self.reset_window()

    @property
    def last_window(self) -> Optional[WindowStats]:
        """The statistics behind the last training step that used the window (None before), built on first
        access from what the step kept (the window buffers as they were then)."""
        parts = self._window_parts
        if parts is None or isinstance(parts, WindowStats):
            return parts
        step, cur, compensated, merged, old = parts
        k, c = self.window - 1, self.window_mean.shape[1]
        slot = step % k  # the buffers are as the step left them: that slot held the oldest iteration used
        count, raw_mean, raw_var = self.window_count.clone(), self.window_mean.clone(), self.window_var.clone()
        count[slot], raw_mean[slot], raw_var[slot] = old[0], old[1:1 + c], old[1 + c:]
        mean_p, var_p = compensated if compensated is not None else (raw_mean, raw_var)
        order = torch.tensor([(step - 1 - i) % k for i in range(k)])  # newest first
        count, mean_p, var_p, raw_mean, raw_var = (t[order] for t in (count, mean_p, var_p, raw_mean, raw_var))
        cm = cur.mean.reshape(1, -1).to(mean_p.dtype)
        cv = (cur.m2.reshape(1, -1) / cur.count).to(var_p.dtype)
        stats = WindowStats(
            count=torch.cat([count.new_tensor([float(cur.count)]), count]),
            mean=torch.cat([cm, mean_p]).detach(),
            var=torch.cat([cv, var_p]).detach(),
            raw_mean=torch.cat([cm, raw_mean]).detach(),
            raw_var=torch.cat([cv, raw_var]).detach(),
            window_mean=merged.mean.reshape(-1).detach(),
            window_var=merged.var(0).reshape(-1).detach(),
        )
        self._window_parts = stats
        return stats

    @property
    def layer(self) -> Optional[nn.Module]:
        """The attached preceding layer, or None."""
        return self.__dict__["_layer"]

    def reset_window(self) -> None:
        """Forget the stored iterations (the iteration count is kept)."""
        if "window_count" in self._buffers:
            self.window_count.zero_()
        self._window_parts = None

    def reset_running_stats(self) -> None:
        """BatchNorm's reset, and the window and iteration count too."""
        super().reset_running_stats()
        if "iteration" in self._buffers:
            self.iteration.zero_()
            self.reset_window()

    def extra_repr(self) -> str:
        layer = type(self.layer).__name__ if self.layer is not None else None
        return (f"{super().extra_repr()}, window={self.window}, burn_in={self.burn_in}, "
                f"compensate={self.compensate}, layer={layer}")

    def attach(self, layer: Optional[_Layer]) -> "_CrossIterationBatchNorm":
        """Use ``layer`` (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``) as the preceding layer whose weight
        change is compensated; its output must be this layer's input. ``attach(None)`` detaches. Returns self.

        Registers a forward hook on ``layer`` that passes its input and output to this layer during
        training. Stored iterations are kept if their shapes fit the layer's weight, else cleared.
        """
        name = type(self).__name__
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.__dict__["_layer"] = None
        self._captured = None
        if layer is None:
            return self
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise TypeError(f"{name}.attach: expected nn.Linear, nn.Conv1d or nn.Conv2d, got {type(layer).__name__}")
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if out != self.num_features:
            raise ValueError(f"{name}.attach: the layer has {out} output channels, this layer normalizes "
                             f"{self.num_features}")
        groups = 1 if isinstance(layer, nn.Linear) else layer.groups
        f = layer.weight[0].numel()
        k = self.window - 1
        want = {"window_dmean": (k, groups, f), "window_dvar": (k, self.num_features, f)}
        if any(tuple(self._buffers[n].shape) != s for n, s in want.items()):
            for n, s in want.items():
                old = self._buffers[n]
                self._buffers[n] = torch.zeros(s, dtype=old.dtype, device=old.device)
            self.reset_window()
        self.__dict__["_layer"] = layer
        self._hook = layer.register_forward_hook(self._capture)
        return self

    def _capture(self, module: nn.Module, args: Tuple[Any, ...], output: Tensor) -> None:
        if self.training and self.compensate and self.window > 1:
            self._captured = (args[0], output)

    def __getstate__(self) -> dict:
        # the captured tensors are transient (graph nodes of the current step): never copied or pickled
        state = super().__getstate__()
        return {**state, "_captured": None}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for n in ("window_dmean", "window_dvar"):  # their shape follows the preceding layer's weight
            t = state_dict.get(prefix + n)
            if isinstance(t, Tensor) and t.dim() == 3 and t.shape != self._buffers[n].shape:
                old = self._buffers[n]
                self._buffers[n] = torch.zeros(t.shape, dtype=old.dtype, device=old.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._window_parts = None  # last_window is built from the buffers as the last step left them

    # -- forward ----------------------------------------------------------------------------------
    def _take_capture(self, x: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        captured = self._captured
        self.__dict__["_captured"] = None  # (per step: past nn.Module.__setattr__'s checks)
        name = type(self).__name__
        if self.layer is None:
            raise ValueError(f"{name}: compensate=True needs the preceding layer; call .attach(layer) with the "
                             "nn.Linear/nn.Conv1d/nn.Conv2d whose output this layer normalizes (or set "
                             "compensate=False for naive windowed statistics)")
        if captured is None or captured[1] is not x:
            raise ValueError(f"{name}: the input is not the latest output of the attached "
                             f"{type(self.layer).__name__}; CBN must directly follow the layer it is attached to")
        return captured

    def _past(self) -> Tuple[Tensor, Tensor]:
        """Per-slot ``(mean, var)`` of the stored iterations, compensated to the current weights if enabled."""
        buffers = self._buffers  # (the layer's hot path: no nn.Module.__getattr__, see NormBase._state)
        mean, var = buffers["window_mean"], buffers["window_var"]
        layer = self.layer
        if not self.compensate or layer is None:
            return mean, var
        with torch.no_grad():
            pw, gw = _weight_dots(layer, self.window_dmean, self.window_dvar)
            dmu = pw - self.window_wmean  # P . (W_t - W_tau): exact, mu is linear in W
            dvar = gw - self.window_wvar  # G . (W_t - W_tau)
            shift = dmu
            if layer.bias is not None:
                shift = dmu + (layer.bias.detach().to(mean.dtype) - self.window_bias)
            return mean + shift, (var + dvar - dmu * dmu).clamp_min(0.0)

    def _record(self, slot: int, cur: Moments, captured: Optional[Tuple[Tensor, Tensor]],
                keep_old: bool = False) -> Optional[Tensor]:
        """Store this iteration's moments in ``slot``; with ``keep_old``, return the slot's count, mean and var
        before (float64 ``(1 + 2 C,)``)."""
        buffers = self._buffers
        mean = cur.mean.reshape(-1)  # (the moments are constants: no graph to keep out of)
        old = native_window.record(slot, buffers["window_count"], buffers["window_mean"], buffers["window_var"],
                                   float(cur.count), mean, cur.m2.reshape(-1), keep_old)
        if old is None or captured is not None:
            return self._record_slowly(slot, cur, captured, keep_old, old)
        return old if keep_old else None

    def _record_slowly(self, slot: int, cur: Moments, captured: Optional[Tuple[Tensor, Tensor]], keep_old: bool,
                       old: Optional[Tensor]) -> Optional[Tensor]:
        """:meth:`_record` with tensor operations, where the native kernels did not store the moments (``old`` is
        None), and the compensation's terms (``captured``)."""
        with torch.no_grad():
            mean = cur.mean.reshape(-1)
            if old is None:
                if keep_old:
                    old = torch.cat([self.window_count[slot:slot + 1], self.window_mean[slot],
                                     self.window_var[slot]]).to(torch.float64)
                self.window_count[slot] = float(cur.count)
                self.window_mean[slot] = mean
                self.window_var[slot] = cur.m2.reshape(-1) / cur.count
        if captured is not None:
            self._record_compensation(slot, mean, captured)
        return old if keep_old else None

    @torch.no_grad()
    def _record_compensation(self, slot: int, mean: Tensor, captured: Tuple[Tensor, Tensor]) -> None:
        """Store in ``slot`` the compensation's terms of this step (the preceding layer's input and output,
        ``captured``; ``mean``: the batch's own per-channel mean)."""
        layer = self.layer
        dmean, dvar = batch_moment_grads(layer, captured[0], captured[1], mean)
        pw, gw = _weight_dots(layer, dmean, dvar)
        self.window_dmean[slot] = dmean
        self.window_dvar[slot] = dvar
        self.window_wmean[slot] = pw
        self.window_wvar[slot] = gw
        self.window_bias[slot] = layer.bias.detach() if layer.bias is not None else 0.0

    def forward(self, input: Tensor) -> Tensor:
        x = self._check_input(input)
        weight, bias, running_mean, running_var, counter = self._state()
        if not (self.training or running_mean is None):
            return fixed_affine(x, running_mean, running_var, weight, bias, self.eps)
        self._check_batch_stats(x)
        if not self.training:  # no running statistics: plain batch statistics in eval
            return channel_norm(x, weight, bias, Policy("batch"), self.eps, moments=False)[0]
        factor = self._momentum_factor(counter)
        k, step = self.window, count_batch_(self._buffers["iteration"]) - 1  # the iteration buffer counts the steps
        use_window = k > 1 and step >= self.burn_in
        record = k > 1 and step >= self.burn_in - (k - 1)
        captured = self._take_capture(x) if record and self.compensate else None
        lay = native.supported_layout(x)
        compiled = native_ops.ops() if lay is not None else None
        if compiled is not None:  # the window's merge, BatchNorm and the record in one operator (autograd in C++)
            return self._step_compiled(compiled, x, lay, weight, bias, running_mean, running_var, factor, step,
                                       use_window, record, captured)
        extra = None
        if use_window:  # the past iterations as constant moments, merged into the batch's in channel_norm
            mean_p, var_p = self._past()
            extra = self._window_moments(mean_p, var_p)
        own: list = []
        running = Running(running_mean, running_var, factor) if self.track_running_stats else None
        y, merged = channel_norm(x, weight, bias, Policy("batch"), self.eps, extra=extra, running=running, own=own)
        cur = own[0]  # the batch's own moments, (1, C)
        old = self._record(step % (k - 1), cur, captured, keep_old=use_window) if record else None
        if use_window:
            self._keep_window_parts(step, cur, mean_p, var_p, merged, old)
        return y

    def _keep_window_parts(self, step: int, cur: Moments, mean_p: Tensor, var_p: Tensor, merged: Moments,
                           old: Tensor) -> None:
        """Keep what :attr:`last_window` is built from, on access (the slot this step overwrote is in ``old``; the
        past moments as used, where compensated, else the buffers, changed since)."""
        compensated = mean_p is not self._buffers["window_mean"]
        self.__dict__["_window_parts"] = (step, cur, (mean_p, var_p) if compensated else None, merged, old)

    def _step_compiled(self, compiled: native_ops.Ops, x: Tensor, lay: int, weight: Optional[Tensor],
                       bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       factor: float, step: int, use_window: bool, record: bool,
                       captured: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
        """A training step on :func:`normzoo.native_ops`'s ``cross_iteration_norm``: what :meth:`forward` does with
        :meth:`_window_moments`, ``channel_norm`` and :meth:`_record`, in one call."""
        buffers = self._buffers
        count_buf, mean_buf, var_buf = buffers["window_count"], buffers["window_mean"], buffers["window_var"]
        mean_p, var_p = self._past() if use_window else (mean_buf, var_buf)
        track = self.track_running_stats
        slot = step % (self.window - 1) if record else -1
        native.wake_workers(x)
        y, stats, old, total = compiled.cross_iteration_norm(
            x, weight, bias, running_mean if track else None, running_var if track else None, factor, self.eps, lay,
            use_window, count_buf, mean_p, var_p, slot, count_buf, mean_buf, var_buf, use_window)
        if captured is None and not use_window:
            return y
        rows = stats.unsqueeze(1)  # (1, C) each: the merged mean, M2, rstd, [then the batch's own mean, M2]
        count = x.numel() // x.shape[1]
        cur = Moments(count, rows[-2], rows[-1]) if use_window else Moments(count, rows[0], rows[1])
        if captured is not None:
            self._record_compensation(slot, cur.mean.reshape(-1), captured)
        if use_window:
            self._keep_window_parts(step, cur, mean_p, var_p, Moments(total, rows[0], rows[1]), old)
        return y

    def _window_moments(self, mean_p: Tensor, var_p: Tensor) -> Moments:
        """The window's slots merged per channel: constant moments of shape ``(1, C)``, one count for all."""
        window_count = self._buffers["window_count"]
        merged = native_window.merge(window_count, mean_p, var_p)
        if merged is not None:
            return Moments(*merged)
        with torch.no_grad():
            return self._merge_slowly(window_count, mean_p, var_p)

    @staticmethod
    def _merge_slowly(window_count: Tensor, mean_p: Tensor, var_p: Tensor) -> Moments:
        counts = window_count.unsqueeze(1)
        past = Moments(counts, mean_p, var_p * counts).reduce(0, keepdim=True)
        return Moments(float(window_count.sum()), past.mean, past.m2)


@register("cbn1d", "crossiterationbatchnorm1d")
class CrossIterationBatchNorm1d(_CrossIterationBatchNorm):
    __doc__ = _CrossIterationBatchNorm.__doc__
    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


@register("cbn2d", "crossiterationbatchnorm2d", "cbn")
class CrossIterationBatchNorm2d(_CrossIterationBatchNorm):
    __doc__ = _CrossIterationBatchNorm.__doc__
    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


__all__ = ["CrossIterationBatchNorm1d", "CrossIterationBatchNorm2d", "WindowStats", "batch_moment_grads"]
