"""Models for the lab, with the normalization layer chosen by name.

Layers come from :func:`normzoo.create` (the registry). The lab speaks in *kinds*, which map to registry
names by the input the layer sees -- vectors ``(N, C)`` after a linear layer, or sequences ``(N, C, L)``
after a 1-D convolution:

=========  ===========================  ==========================================================
kind       registry name                notes
=========  ===========================  ==========================================================
``none``   --                           identity
``bn``     ``bn1d``                     BatchNorm
``mbn``    ``mbn1d``                    mean-only BatchNorm (Salimans & Kingma 2016)
``gn``     ``gn``                       GroupNorm, ``groups`` (default 8) channel groups
``ln``     ``ln`` / ``gn`` (groups=1)   LayerNorm; on ``(N, C, L)`` it is GroupNorm with one group, i.e.
                                        statistics over (C, L) per sample and a per-channel affine, as
                                        in the GroupNorm paper's comparison
``in``     ``in1d``                     InstanceNorm with affine parameters
``brn``    ``brn1d``                    Batch Renormalization
``bin``    ``bin1d``                    Batch-Instance Normalization
``sn``     ``switch1d``                 Switchable Normalization
``cbn``    ``cbn1d``                    Cross-Iteration BatchNorm (attached to its preceding layer)
=========  ===========================  ==========================================================

While normzoo's own core layers are not importable the four torch.nn equivalents (``bn1d``, ``gn``, ``ln``,
``in1d``) stand in, and :func:`layer_source` says which implementation ran; the other kinds have no stand-in:
an experiment that needs them is *pending* until they exist (see :func:`missing`).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["KINDS", "nn_function", "registry_name", "layer_source", "missing", "make_norm", "MLP", "ConvNet1d", "GhostNorm",
           "norm_layers"]

#: lab kind -> (registry name for vectors, registry name for sequences)
KINDS: Dict[str, tuple] = {
    "bn": ("bn1d", "bn1d"),
    "mbn": ("mbn1d", "mbn1d"),
    "gn": ("gn", "gn"),
    "ln": ("ln", "gn"),
    "in": (None, "in1d"),
    "brn": ("brn1d", "brn1d"),
    "bin": ("bin1d", "bin1d"),
    "sn": ("switch1d", "switch1d"),
    "cbn": ("cbn1d", "cbn1d"),
}

_TORCH_STANDINS = {
    "bn1d": lambda c, **kw: nn.BatchNorm1d(c, **kw),
    "gn": lambda c, groups=8, **kw: nn.GroupNorm(groups, c, **kw),
    "ln": lambda c, **kw: nn.LayerNorm(c, **kw),
    "in1d": lambda c, **kw: nn.InstanceNorm1d(c, **{"affine": True, **kw}),
}

#: functions of normzoo.nn that experiments need (checked with hasattr)
_NN_FUNCTIONS = {"weight_norm", "data_dependent_init", "spectral_norm", "spectral_sigma"}


def registry_name(kind: str, spatial: bool) -> str:
    """The registry name used for a lab ``kind`` on vectors (``spatial=False``) or sequences."""
    if kind not in KINDS:
        raise ValueError(f"normzoo.lab: unknown norm kind {kind!r}; expected 'none' or one of {sorted(KINDS)}")
    name = KINDS[kind][1 if spatial else 0]
    if name is None:
        raise ValueError(f"normzoo.lab: norm kind {kind!r} needs spatial input (N, C, L)")
    return name


def _normzoo_factory(name: str):
    """normzoo's factory for a registry name, or None when normzoo does not provide it (yet)."""
    try:
        from normzoo import registry
        return registry.lookup(name)
    except ValueError:  # not registered (yet)
        return None
    except Exception:  # noqa: BLE001 -- normzoo.nn itself does not import (yet): treat every layer as missing
        return None


def _normzoo_function(name: str):
    try:
        import normzoo.nn as znn
    except Exception:  # noqa: BLE001 -- see _normzoo_factory
        return None
    return getattr(znn, name, None)


def nn_function(name: str):
    """``normzoo.nn.<name>`` (ValueError when normzoo does not provide it)."""
    fn = _normzoo_function(name)
    if fn is None:
        raise ValueError(f"normzoo.lab: normzoo.nn.{name} is not available yet")
    return fn


def layer_source(name: str) -> Optional[str]:
    """``"normzoo"``, ``"torch.nn stand-in"`` or ``None`` (missing) for a registry name or a function of
    :mod:`normzoo.nn` (``weight_norm``, ``data_dependent_init``, ``spectral_norm``, ``spectral_sigma``)."""
    if name in _NN_FUNCTIONS:
        return "normzoo" if _normzoo_function(name) is not None else None
    if _normzoo_factory(name) is not None:
        return "normzoo"
    return "torch.nn stand-in" if name in _TORCH_STANDINS else None


def missing(requirements: Iterable[str]) -> List[str]:
    """The requirements (registry names or :mod:`normzoo.nn` functions) that cannot be met now."""
    return [r for r in requirements if layer_source(r) is None]


def make_norm(kind: str, num_channels: int, spatial: bool = False, **kwargs: Any) -> nn.Module:
    """A normalization layer of ``kind`` for ``num_channels`` channels (``nn.Identity`` for ``"none"``).

    ``groups`` is accepted for ``gn`` (default 8, or the channel count when smaller); ``ln`` on sequences is
    GroupNorm with one group. Other keyword arguments go to the layer's constructor.
    """
    if kind == "none":
        return nn.Identity()
    name = registry_name(kind, spatial)
    if name == "gn":
        kwargs.setdefault("groups", 1 if kind == "ln" else min(8, num_channels))
    factory = _normzoo_factory(name) or _TORCH_STANDINS.get(name)
    if factory is None:
        raise ValueError(f"normzoo.lab: normalization {name!r} (kind {kind!r}) is not available in normzoo yet")
    return factory(num_channels, **kwargs)


def norm_layers(model: nn.Module, types: Optional[tuple] = None) -> List[nn.Module]:
    """The normalization modules of ``model`` in forward order (those tagged by :func:`make_norm`'s users)."""
    return [m for m in model.modules() if getattr(m, "_lab_norm", False) and (types is None or isinstance(m, types))]


def _tag(m: nn.Module) -> nn.Module:
    m._lab_norm = True  # type: ignore[attr-defined]
    return m


def _attach(norm: nn.Module, layer: nn.Module) -> None:
    """Hand a norm that compensates for its preceding layer (Cross-Iteration BN) that layer."""
    if getattr(norm, "compensate", False) and callable(getattr(norm, "attach", None)):
        norm.attach(layer)


class GhostNorm(nn.Module):
    """Apply ``inner`` separately to consecutive chunks of ``group`` samples in training ("ghost batches").

    In evaluation the whole batch goes through ``inner`` at once (it then uses its running statistics).
    The batch size must be a multiple of ``group``.
    """

    def __init__(self, inner: nn.Module, group: int) -> None:
        super().__init__()
        if group < 1:
            raise ValueError(f"GhostNorm: group must be >= 1, got {group}")
        self.inner, self.group = inner, int(group)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.shape[0] <= self.group:
            return self.inner(x)
        if x.shape[0] % self.group:
            raise ValueError(f"GhostNorm: batch of {x.shape[0]} is not a multiple of group={self.group}")
        return torch.cat([self.inner(chunk) for chunk in x.split(self.group)], dim=0)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"normzoo.lab: unknown activation {name!r}; expected 'relu', 'sigmoid' or 'tanh'")


class MLP(nn.Module):
    """``[Linear -> norm -> activation] x len(hidden) -> Linear``.

    ``weight_scale``: when given, every weight is drawn from ``N(0, weight_scale^2)`` and biases start at 0
    (CS231n's ``weight_scale``); otherwise torch's default initialization.
    ``blocks[i]`` is the i-th hidden block (``linear``, ``norm``, ``act``), so hooks can read the input of
    an activation (``blocks[i].norm``'s output).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu",
                 norm: str = "none", weight_scale: Optional[float] = None, norm_kwargs: Optional[dict] = None,
                 ghost_group: Optional[int] = None) -> None:
        super().__init__()
        blocks, width = [], in_features
        for h in hidden:
            block = nn.Module()
            block.linear = nn.Linear(width, h)
            n = make_norm(norm, h, spatial=False, **(norm_kwargs or {}))
            if norm != "none":
                _tag(n)
                _attach(n, block.linear)
                if ghost_group:
                    n = GhostNorm(n, ghost_group)
            block.norm = n
            block.act = _activation(activation)
            blocks.append(block)
            width = h
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, num_classes)
        if weight_scale is not None:
            for lin in [b.linear for b in self.blocks] + [self.head]:
                nn.init.normal_(lin.weight, 0.0, weight_scale)
                nn.init.zeros_(lin.bias)

    def linears(self) -> List[nn.Linear]:
        return [b.linear for b in self.blocks] + [self.head]

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b.act(b.norm(b.linear(x)))
        return self.head(x)


class ConvNet1d(nn.Module):
    """A small 1-D conv net for MNIST-1D: three ``Conv1d -> norm -> ReLU`` stages, average pool, linear.

    Shapes: ``(N, 1, 40) -> (N, C, 40) -> (N, C, 20) -> (N, C, 10) -> mean over length -> (N, 10)``.
    """

    def __init__(self, norm: str = "bn", channels: int = 32, num_classes: int = 10, in_channels: int = 1,
                 norm_kwargs: Optional[dict] = None, ghost_group: Optional[int] = None) -> None:
        super().__init__()
        specs = [(in_channels, 5, 1, 2), (channels, 3, 2, 1), (channels, 3, 2, 1)]
        self.convs = nn.ModuleList(nn.Conv1d(cin, channels, k, stride=s, padding=p) for cin, k, s, p in specs)
        norms = []
        for conv in self.convs:
            n = make_norm(norm, channels, spatial=True, **(norm_kwargs or {}))
            if norm != "none":
                _tag(n)
                _attach(n, conv)
                if ghost_group:
                    n = GhostNorm(n, ghost_group)
            norms.append(n)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return self.head(x.mean(dim=2))


def chance(num_classes: int) -> float:
    return 1.0 / num_classes


def log_range(lo: float, hi: float, n: int) -> List[float]:
    """``n`` values evenly spaced in log10 between ``10**lo`` and ``10**hi`` (``numpy.logspace``)."""
    if n == 1:
        return [10.0 ** hi]
    return [10.0 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)]
