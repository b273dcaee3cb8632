"""Convert a model's BatchNorm layers to :class:`normzoo.nn.SyncBatchNorm` and back.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` has three traps this avoids: the result refuses CPU
tensors (so a model converted for a gloo job or a CPU test cannot run), there is no way back (a model
trained with SyncBN is usually served on one device, where plain BN is simpler and faster), and a
BatchNorm-family layer it does not know (mean-only BN, Batch Renorm, ...) silently stays local. Here:
BatchNorm1d/2d/3d (torch's and normzoo's), ``torch.nn.SyncBatchNorm`` and mean-only BatchNorm convert,
carrying parameters, running statistics, options, device, dtype, mode and the frozen state;
:func:`revert_sync` restores the original classes; a BatchNorm-family layer with no synchronized
version is named in a warning. Other methods plug in with :func:`register_sync`.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional

from torch import nn

from normzoo.nn.sync import SyncBatchNorm, all_gather_moments, global_batch_moments, sync_batch_norm, world_size
from normzoo.tools import _layers
from normzoo.tools.convert import adopt

SyncMaker = Callable[[nn.Module, Any], nn.Module]
_SYNC_MAKERS: Dict[type, SyncMaker] = {}
_REVERT_ATTR = "_normzoo_revert_to"
_DEFAULTS_LOADED = False


def register_sync(cls: type, maker: SyncMaker) -> None:
    """Teach :func:`convert_sync` a layer class: ``maker(layer, process_group)`` returns its synchronized
    version (uninitialised state is fine: parameters and buffers are then loaded from ``layer``'s
    ``state_dict``, so the keys must match)."""
    if not isinstance(cls, type) or not callable(maker):
        raise TypeError(f"register_sync: expected a class and a callable, got {cls!r} and {maker!r}")
    _SYNC_MAKERS[cls] = maker


def _bias_kw(m: nn.Module) -> Dict[str, bool]:
    return {"bias": m.bias is not None} if getattr(m, "weight", None) is not None else {}


def _sync_maker(mean_only: bool) -> SyncMaker:
    def make(m: nn.Module, process_group: Any) -> nn.Module:
        return SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                             process_group=process_group, mean_only=mean_only, **_bias_kw(m))

    return make


def _ensure_defaults() -> None:
    global _DEFAULTS_LOADED
    if _DEFAULTS_LOADED:
        return
    _DEFAULTS_LOADED = True
    import normzoo.nn as znn

    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                znn.BatchNorm1d, znn.BatchNorm2d, znn.BatchNorm3d):
        _SYNC_MAKERS.setdefault(cls, _sync_maker(False))
    for cls in (znn.MeanOnlyBatchNorm1d, znn.MeanOnlyBatchNorm2d, znn.MeanOnlyBatchNorm3d):
        _SYNC_MAKERS.setdefault(cls, _sync_maker(True))


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace the BatchNorm-family layers of ``model`` by :class:`~normzoo.nn.SyncBatchNorm` (in place).

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, ``normzoo.nn.BatchNorm1d/2d/3d``,
    ``normzoo.nn.MeanOnlyBatchNorm1d/2d/3d`` (to ``SyncBatchNorm(mean_only=True)``) and classes added with
    :func:`register_sync` (exact classes: a subclass may change the computation). Each new layer has the old
    one's options, parameters and running statistics (``state_dict`` loaded strictly), device, dtype,
    train/eval mode, ``requires_grad`` flags and frozen state, and remembers the old class for
    :func:`revert_sync`. ``process_group``: the group to synchronize over (default: the whole world).
    Existing normzoo ``SyncBatchNorm`` layers get the new ``process_group``. Returns the model (or the new
    layer when ``model`` is itself a BatchNorm). BatchNorm-family layers that cannot be converted stay and
    are named in a warning, since they would normalize with per-process statistics.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync: expected an nn.Module, got {type(model).__name__}")
    _ensure_defaults()
    plan: Dict[int, nn.Module] = {}
    left: List[str] = []
    for name, m in model.named_modules():
        if type(m) is SyncBatchNorm:
            m.process_group = process_group
            continue
        maker = _SYNC_MAKERS.get(type(m))
        if maker is None:
            if _layers.keeps_batch_stats(m):
                left.append(_layers.describe(name, m))
            continue
        new = maker(m, process_group)
        new.load_state_dict(m.state_dict())
        new.__dict__[_REVERT_ATTR] = type(m)
        plan[id(m)] = adopt(new, m, model)
    if left:
        warnings.warn(
            "convert_sync: no synchronized version of these BatchNorm-family layers; they keep normalizing "
            f"with per-process statistics: {', '.join(left)} (see normzoo.tools.register_sync)",
            stacklevel=2,
        )
    return _layers.replace_modules(model, lambda name, m: plan.get(id(m)))


def revert_sync(model: nn.Module, default_dim: int = 2) -> nn.Module:
    """Replace normzoo ``SyncBatchNorm`` layers by single-process BatchNorm (in place); return the model.

    A layer made by :func:`convert_sync` becomes an instance of the class it was converted from (with the
    same options); any other becomes ``normzoo.nn.BatchNorm{default_dim}d`` (or ``MeanOnlyBatchNorm{d}d``
    for ``mean_only``), since a SyncBatchNorm does not know its input's dimensionality. Parameters, running
    statistics, placement, mode and frozen state carry over as in :func:`convert_sync`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert_sync: expected an nn.Module, got {type(model).__name__}")
    if default_dim not in (1, 2, 3):
        raise ValueError(f"revert_sync: default_dim must be 1, 2 or 3, got {default_dim!r}")
    import normzoo.nn as znn

    plan: Dict[int, nn.Module] = {}
    for _, m in model.named_modules():
        if type(m) is not SyncBatchNorm:
            continue
        cls: Optional[type] = m.__dict__.get(_REVERT_ATTR)
        if cls is None:
            stem = "MeanOnlyBatchNorm" if m.mean_only else "BatchNorm"
            cls = getattr(znn, f"{stem}{default_dim}d")
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_bias_kw(m))
        new.load_state_dict(m.state_dict())
        plan[id(m)] = adopt(new, m, model)
    return _layers.replace_modules(model, lambda name, m: plan.get(id(m)))


__all__ = [
    "SyncBatchNorm",
    "convert_sync",
    "revert_sync",
    "register_sync",
    "sync_batch_norm",
    "global_batch_moments",
    "all_gather_moments",
    "world_size",
]
