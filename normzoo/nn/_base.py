"""The shared base of every layer with per-channel parameters and running statistics.

Mirrors ``torch.nn``'s BatchNorm/InstanceNorm base: the same constructor arguments, parameters
(``weight``, ``bias``), buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) and hence
state_dict keys, ``reset_parameters``, ``reset_running_stats``, and the same rule for the momentum:
``momentum=None`` makes the running statistics the cumulative average of all batches seen
(factor ``1 / num_batches_tracked``), the seeds' "store every batch's statistics" in O(C) memory.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from normzoo import _checks
from normzoo.running import count_batch_


def init_affine(module: nn.Module, shape: Any, weight: bool, bias: bool, device: Any = None, dtype: Any = None) -> None:
    """Register ``weight`` (gamma, initialised to 1) and ``bias`` (beta, initialised to 0) of ``shape`` on
    ``module``, or ``None`` in their place, as torch.nn's norm layers do."""
    for name, wanted in (("weight", weight), ("bias", bias)):
        if wanted:
            setattr(module, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        else:
            module.register_parameter(name, None)
    reset_affine(module)


def affine_of(module: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """A layer's ``(weight, bias)`` for its forward, read straight from its ``_parameters`` (see
    :meth:`NormBase._state`), else through ``getattr`` (a parametrization's property in their place)."""
    params = module._parameters
    try:
        return params["weight"], params["bias"]
    except KeyError:
        return module.weight, module.bias  # type: ignore[return-value]


def reset_affine(module: nn.Module) -> None:
    """``weight`` to 1 and ``bias`` to 0, where present."""
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class NormBase(nn.Module):
    """Per-channel affine parameters and running statistics (``torch.nn`` layout).

    ``bias=False`` (keyword-only, as in torch >= 2.13) keeps the ``weight`` but drops the additive ``beta``.
    """

    _version = 2
    #: Dims of input the layer accepts (batched), and whether an unbatched input (one dim less) is allowed.
    _input_dims: Tuple[int, ...] = ()
    _shape_hint: str = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True) -> None:
        name = type(self).__name__
        _checks.check_positive_int(name, "num_features", num_features)
        _checks.check_eps(name, eps)
        _checks.check_momentum(name, momentum)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        init_affine(self, num_features, affine, affine and bias, device, dtype)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
            self.running_mean: Optional[Tensor]
            self.running_var: Optional[Tensor]
            self.num_batches_tracked: Optional[Tensor]
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Running statistics to mean 0 / variance 1, ``weight`` (gamma) to 1 and ``bias`` (beta) to 0."""
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={use_bias}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__, use_bias=self.bias is not None)
        )

    # -- the forward protocol ------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> Tensor:
        return _checks.check_input(type(self).__name__, x, self._input_dims, self.num_features, self._shape_hint)

    def _check_batch_stats(self, x: Tensor, per_sample: bool = False) -> None:
        """Training on batch statistics needs more than one value per statistics group."""
        per_row = x.numel() // (x.shape[0] * x.shape[1]) if x.numel() else 0
        if per_sample:
            _checks.check_batch_stats(type(self).__name__, x, per_row, "spatial element per channel")
        else:
            _checks.check_batch_stats(type(self).__name__, x, per_row * x.shape[0])

    def _state(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``(weight, bias, running_mean, running_var, num_batches_tracked)`` for a forward, read straight from the
        module's ``_parameters`` and ``_buffers``: ``nn.Module.__getattr__`` is a Python function, and reading the
        five through it cost a layer's forward 8 us of its 57 at 2x8x4x4 (2 cores, after a 300 us pause). Where one
        is not there (a parametrization's property, a plain attribute in its place), through ``getattr``."""
        params, buffers = self._parameters, self._buffers
        try:
            return (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
                    buffers["num_batches_tracked"])
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked

    def _momentum_factor(self, counter: Optional[Tensor]) -> float:
        """Advance ``counter`` (the module's ``num_batches_tracked``; training with tracking) and return this
        step's averaging factor."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and counter is not None:
            count = count_batch_(counter)
            factor = 1.0 / count if self.momentum is None else self.momentum
        return factor

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # checkpoints from before num_batches_tracked existed (torch < 0.4.1) load with a zero count
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


__all__ = ["NormBase", "init_affine", "reset_affine", "affine_of"]
