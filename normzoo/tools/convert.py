"""Replace every normalization layer of a model by another method, carrying what carries over.

The chore: swap BatchNorm for GroupNorm (small batches), for Batch Renorm, for SyncBatchNorm, or move a
model between ``torch.nn`` and ``normzoo.nn``. Done by hand it has several traps, each handled here:

- **Nested modules**: layers inside ``Sequential``/``ModuleList``/``ModuleDict`` and reached by attribute are
  all replaced, and a layer shared by two parents becomes one shared new layer.
- **Learned parameters and statistics are lost** when a fresh layer is dropped in. The per-channel
  ``weight``/``bias`` are copied whenever both layers have them with the same shape (they mean the same
  thing in every method: ``y = weight * x_hat + bias``), and the running statistics
  (``running_mean``, ``running_var``, ``num_batches_tracked``) between layers of the BatchNorm family,
  where they mean the same thing (running moments of the layer's input over the batch; an InstanceNorm's
  running statistics are averages of per-sample moments and are not carried).
- **Placement**: the new layer gets the old one's device, floating dtype, train/eval mode, the
  ``requires_grad`` flags of its parameters, and its frozen state (:func:`normzoo.tools.freeze`). Norm
  layers hold only 1-d tensors, so the model's memory format (``channels_last``) is untouched; normzoo's
  layers keep the input's memory format.
- **Dimensionality**: a target name ending in ``1d``/``2d``/``3d`` names a family; each layer gets the member
  matching its own dimensionality, so ``convert(model, "brn2d")`` turns ``BatchNorm1d`` into ``brn1d`` and
  ``BatchNorm2d`` into ``brn2d``. Dimension-free methods (``"gn"``, ``"ln2d"``, ``"frn"``) apply to any.
- **Layout**: by default only layers of the target's layout are converted. Channel-first layers
  (``num_features``/``num_channels``: BN, IN, GN, channel-first LN, ...) become a channel-first target;
  last-dims layers (``normalized_shape``: LayerNorm, RMSNorm) become a last-dims target (``"ln"``,
  ``"rms"``), so ``convert(resnet_with_a_layernorm_head, "gn")`` leaves the LayerNorm alone.

The constructor options ``eps`` and ``affine`` (``elementwise_affine`` for last-dims layers) are carried
over, and ``momentum``/``track_running_stats`` between BatchNorm-family layers, unless given explicitly
(a target that does not accept one simply does not get it). Forward/backward hooks registered on the old
layers are not carried over. Everything is planned before anything changes: an error leaves the model
as it was.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from normzoo import registry
from normzoo.tools import _layers
from normzoo.tools.freeze import freeze, is_frozen

Target = Union[str, Callable[[nn.Module], nn.Module]]
Source = Union[type, Tuple[type, ...], Callable[[nn.Module], bool], None]

_LAST_DIMS = "last-dims"
_CHANNEL_FIRST = "channel-first"


# -- layout and naming ------------------------------------------------------------------------------
def _layout_of_layer(module: nn.Module) -> Optional[str]:
    if _layers.is_channel_first(module):
        return _CHANNEL_FIRST
    if hasattr(module, "normalized_shape"):
        return _LAST_DIMS
    return None


def _layout_of_factory(factory: Callable[..., nn.Module]) -> str:
    """A factory whose first argument is ``normalized_shape`` makes last-dims layers; any other, channel-first."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return _CHANNEL_FIRST
    first = params[0].name if params else ""
    return _LAST_DIMS if first == "normalized_shape" else _CHANNEL_FIRST


def _family_member(canonical: str, module: nn.Module, known: Dict[str, str]) -> str:
    """``brn2d`` for a ``BatchNorm2d`` source, ``brn1d`` for a ``BatchNorm1d`` one (if registered).

    The family is read from the canonical name or any alias of it that ends in ``1d``/``2d``/``3d``
    (``"frn"`` is also ``"frn2d"``, so a ``BatchNorm1d`` becomes ``"frn1d"``).
    """
    dim = _layers.layer_dim(module)
    if dim is None:
        return canonical
    names = [canonical] + sorted(a for a, c in known.items() if c == canonical and a != canonical)
    for n in names:
        m = re.fullmatch(r"(.+?)([123])d", n)
        if m is not None:
            return known.get(f"{m.group(1)}{dim}d", canonical)
    return canonical


def _channel_arg(module: nn.Module, layout: str, where: str) -> Any:
    """The first argument of the target's constructor: the channel count or the normalized shape."""
    c = _layers.num_channels(module)
    shape = getattr(module, "normalized_shape", None)
    if layout == _CHANNEL_FIRST:
        if c is not None:
            return c
        if shape is not None and len(tuple(shape)) == 1:
            return int(tuple(shape)[0])
        raise ValueError(
            f"convert: cannot turn {where} (normalized_shape={tuple(shape) if shape is not None else None}) "
            "into a channel-first layer: it has no single channel count"
        )
    if shape is not None:
        return tuple(shape)
    if c is not None:
        return c
    raise ValueError(f"convert: {where} has neither a channel count nor a normalized_shape")


# -- carrying options, parameters and statistics ---------------------------------------------------
def _carried_options(old: nn.Module, with_batch_options: bool) -> Dict[str, Any]:
    opts: Dict[str, Any] = {}
    eps = getattr(old, "eps", None)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):
        opts["eps"] = eps
    for key in ("affine", "elementwise_affine"):
        v = getattr(old, key, None)
        if isinstance(v, bool):
            opts[key] = v
            break
    if getattr(old, "weight", None) is not None and "bias" in old._parameters and old._parameters["bias"] is None:
        opts["bias"] = False
    if with_batch_options:
        if hasattr(old, "momentum"):
            opts["momentum"] = old.momentum
        v = getattr(old, "track_running_stats", None)
        if isinstance(v, bool):
            opts["track_running_stats"] = v
    return opts


def _create(name: str, channels: Any, kwargs: Dict[str, Any], carried: Dict[str, Any]) -> nn.Module:
    """``registry.create`` with the user's kwargs and the carried options the factory accepts."""
    carried = {k: v for k, v in carried.items() if k not in kwargs}
    while True:
        try:
            return registry.create(name, channels, **carried, **kwargs)
        except TypeError as e:
            bad = [k for k in carried if f"'{k}'" in str(e)]
            if not bad:
                raise
            for k in bad:
                del carried[k]


def carry_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy what means the same in both layers from ``old`` into ``new`` (in place) and return ``new``.

    ``weight`` and ``bias`` when both layers have them with the same shape; ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` when both belong to the BatchNorm family (and have them with
    the same shape); ``requires_grad`` flags of same-named parameters.
    """
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src, dst = getattr(old, pname, None), getattr(new, pname, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
        if _layers.keeps_batch_stats(old) and _layers.keeps_batch_stats(new):
            src_stats, dst_stats = _layers.running_stats(old), _layers.running_stats(new)
            for bname, dst in dst_stats.items():
                src = src_stats.get(bname)
                if src is not None and src.shape == dst.shape:
                    dst.copy_(src)
    _layers.copy_requires_grad(new, old)
    return new


def adopt(new: nn.Module, old: nn.Module, model: nn.Module) -> nn.Module:
    """Make ``new`` take ``old``'s place: device, dtype, train/eval mode, the state that carries over
    (:func:`carry_state`) and, if ``old`` was frozen (:func:`normzoo.tools.freeze`), the frozen state (so that
    :func:`normzoo.tools.unfreeze` on ``new`` restores what it would have restored on ``old``). Returns ``new``.
    ``model`` supplies the placement when ``old`` holds no tensor."""
    new = _layers.match_placement(new, old, model)
    if not is_frozen(old):
        return carry_state(new, old)
    record = old.__dict__["_normzoo_frozen"]
    carry_state(new, old)
    before = record["requires_grad"]
    for pname, p in new.named_parameters(recurse=False):  # the flags old had before it was frozen
        if pname in before:
            p.requires_grad_(before[pname])
    nn.Module.train(new, record["requested"])
    freeze(new, trainable_affine=True, predicate=lambda m: m is new)
    _layers.copy_requires_grad(new, old)  # and the flags it has now
    return new


# -- source selection ------------------------------------------------------------------------------
def _selector(source: Source, target_layout: Optional[str]) -> Callable[[nn.Module], bool]:
    if source is None:
        return lambda m: _layers.is_norm(m) and (target_layout is None or _layout_of_layer(m) == target_layout)
    if isinstance(source, type) or (isinstance(source, tuple) and all(isinstance(t, type) for t in source)):
        types = source
        return lambda m: isinstance(m, types)
    if callable(source):
        return source  # type: ignore[return-value]
    raise TypeError(f"convert: source must be None, a class, a tuple of classes or a predicate, got {source!r}")


# -- torch.nn <-> normzoo.nn -----------------------------------------------------------------------
def _bias_kw(m: nn.Module) -> Dict[str, bool]:
    return {"bias": m.bias is not None} if getattr(m, "weight", None) is not None else {}


def _make_batch_like(cls: type) -> Callable[[nn.Module], nn.Module]:
    def make(m: nn.Module) -> nn.Module:
        return cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **_bias_kw(m))

    return make


def _make_group_norm(cls: type, groups: Optional[int] = None) -> Callable[[nn.Module], nn.Module]:
    def make(m: nn.Module) -> nn.Module:
        g = m.num_groups if groups is None else groups
        return cls(g, m.num_channels, m.eps, m.affine, **_bias_kw(m))

    return make


def _make_layer_norm(cls: type) -> Callable[[nn.Module], nn.Module]:
    def make(m: nn.Module) -> nn.Module:
        return cls(m.normalized_shape, m.eps, m.elementwise_affine, **_bias_kw(m))

    return make


def _make_rms_norm(cls: type) -> Callable[[nn.Module], nn.Module]:
    def make(m: nn.Module) -> nn.Module:
        return cls(m.normalized_shape, m.eps, m.elementwise_affine)

    return make


def _make_sync(cls: type) -> Callable[[nn.Module], nn.Module]:
    def make(m: nn.Module) -> nn.Module:
        return cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                   process_group=m.process_group, **_bias_kw(m))

    return make


def _equivalents(to: str) -> Dict[type, Callable[[nn.Module], nn.Module]]:
    """Exact class -> maker of the equivalent layer in the other library."""
    import normzoo.nn as znn
    from normzoo.nn.sync import SyncBatchNorm

    pairs: List[Tuple[type, type, Callable[[type], Callable[[nn.Module], nn.Module]]]] = [
        (znn.BatchNorm1d, nn.BatchNorm1d, _make_batch_like),
        (znn.BatchNorm2d, nn.BatchNorm2d, _make_batch_like),
        (znn.BatchNorm3d, nn.BatchNorm3d, _make_batch_like),
        (znn.InstanceNorm1d, nn.InstanceNorm1d, _make_batch_like),
        (znn.InstanceNorm2d, nn.InstanceNorm2d, _make_batch_like),
        (znn.InstanceNorm3d, nn.InstanceNorm3d, _make_batch_like),
        (znn.GroupNorm, nn.GroupNorm, _make_group_norm),
        (znn.LayerNorm, nn.LayerNorm, _make_layer_norm),
        (SyncBatchNorm, nn.SyncBatchNorm, _make_sync),
    ]
    if hasattr(nn, "RMSNorm"):
        pairs.append((znn.RMSNorm, nn.RMSNorm, _make_rms_norm))
    if to == "torch":
        table = {ours: make(theirs) for ours, theirs, make in pairs}
        table[znn.LayerNorm2d] = _make_group_norm(nn.GroupNorm, groups=1)  # LN over (C, *S) == GroupNorm(1, C)
        return table
    return {theirs: make(ours) for ours, theirs, make in pairs}


def _convert_library(model: nn.Module, to: str, strict: bool) -> nn.Module:
    home = "normzoo." if to == "torch" else "torch.nn."
    table = _equivalents(to)
    plan: Dict[int, nn.Module] = {}
    missing: List[str] = []
    for name, m in model.named_modules():
        if not _layers.is_norm(m) or not type(m).__module__.startswith(home):
            continue
        maker = table.get(type(m))
        if maker is None or getattr(m, "mean_only", False):  # mean-only SyncBatchNorm: no torch equivalent
            missing.append(_layers.describe(name, m))
            continue
        new = maker(m)
        new.load_state_dict(m.state_dict())  # the same keys by design: an exact transfer
        plan[id(m)] = adopt(new, m, model)
    if missing and strict:
        raise ValueError(
            f"convert to {to}: these layers have no {to} equivalent: {', '.join(missing)} "
            f"(pass strict=False to leave them in place)"
        )
    return _layers.replace_modules(model, lambda name, m: plan.get(id(m)))


def to_torch(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace normzoo layers by their ``torch.nn`` equivalents (in place); return the model.

    Exact transfers (same constructor options, ``state_dict`` loaded strictly): BatchNorm1d/2d/3d,
    InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, RMSNorm, SyncBatchNorm; ``LayerNorm2d`` becomes
    ``torch.nn.GroupNorm(1, C)`` (the same function). Layers without an equivalent (mean-only BN, Batch
    Renorm, Switchable Norm, ...) raise a ``ValueError`` naming them all, or stay with ``strict=False``.
    """
    return _convert_library(model, "torch", strict)


def to_normzoo(model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Replace ``torch.nn`` normalization layers by their normzoo equivalents (in place); return the model.

    The inverse of :func:`to_torch`. ``torch.nn`` layers without an equivalent (``LocalResponseNorm`` is
    not a norm layer here; lazy layers that were never run) raise a ``ValueError``, or stay with
    ``strict=False``.
    """
    return _convert_library(model, "normzoo", strict)


# -- the entry point --------------------------------------------------------------------------------
def convert(model: nn.Module, target: Target, *, source: Source = None, strict: bool = True,
            **kwargs: Any) -> nn.Module:
    """Replace the normalization layers of ``model`` by ``target`` (in place) and return the model.

    ``target``:

    - a registered name (:func:`normzoo.available`): ``convert(model, "gn", groups=32)``,
      ``convert(model, "brn2d")``, ``convert(model, "syncbn")``; ``kwargs`` go to
      :func:`normzoo.create`, after the channel count taken from each layer;
    - ``"torch"`` / ``"normzoo"``: the exact equivalent in the other library (:func:`to_torch`,
      :func:`to_normzoo`; ``strict`` applies there);
    - a callable ``target(old_layer) -> new_layer``: your own factory; the state is carried as for names.

    ``source`` selects the layers to replace: a class or tuple of classes, or a predicate
    ``source(module) -> bool``; by default every normalization layer of the target's layout (see the module
    docstring). Returns the model, or the new layer if ``model`` itself was a selected layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if isinstance(target, str) and target.lower() in ("torch", "normzoo"):
        if kwargs or source is not None:
            raise TypeError(f"convert(model, {target!r}) takes no source or layer options, got "
                            f"{sorted(kwargs) + (['source'] if source is not None else [])}")
        return _convert_library(model, target.lower(), strict)

    if isinstance(target, str):
        factory = registry.lookup(target)  # ValueError with suggestions for an unknown name
        canonical = registry.canonical_name(target)
        known = registry.aliases()
        target_layout: Optional[str] = _layout_of_factory(factory)

        def build(name: str, old: nn.Module) -> nn.Module:
            member = _family_member(canonical, old, known)
            channels = _channel_arg(old, target_layout, _layers.describe(name, old))  # type: ignore[arg-type]
            batch_old = _layers.keeps_batch_stats(old)
            new = _create(member, channels, kwargs, _carried_options(old, with_batch_options=False))
            if batch_old and _layers.keeps_batch_stats(new):
                extra = _carried_options(old, with_batch_options=True)
                if any(k not in kwargs for k in ("momentum", "track_running_stats") if k in extra):
                    new = _create(member, channels, kwargs, extra)
            return new
    elif callable(target):
        if kwargs:
            raise TypeError(f"convert: layer options {sorted(kwargs)} only go with a target name, not a callable")
        target_layout = None

        def build(name: str, old: nn.Module) -> nn.Module:
            new = target(old)
            if not isinstance(new, nn.Module):
                raise TypeError(f"convert: the target callable returned {type(new).__name__} for "
                                f"{_layers.describe(name, old)}, expected an nn.Module")
            return new
    else:
        raise TypeError(f"convert: target must be a registered name, 'torch', 'normzoo' or a callable, "
                        f"got {type(target).__name__}")

    select = _selector(source, target_layout)
    plan: Dict[int, nn.Module] = {}
    for name, m in model.named_modules():
        if id(m) in plan or not select(m):
            continue
        plan[id(m)] = adopt(build(name, m), m, model)
    return _layers.replace_modules(model, lambda name, m: plan.get(id(m)))


__all__ = ["convert", "to_torch", "to_normzoo", "carry_state"]
