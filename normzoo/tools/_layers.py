"""What the tools need to know about normalization layers, whoever wrote them.

The tools work on ``torch.nn``'s layers, on normzoo's and on any layer that follows torch's conventions,
so they recognise layers by what they *are* (attributes, base classes) rather than by a fixed list:

- a **normalization layer** is an instance of one of torch's norm classes (``_NormBase``: BatchNorm/
  InstanceNorm/SyncBatchNorm, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``), of normzoo's
  :class:`~normzoo.nn.NormBase`, or of a class registered with :func:`normzoo.registry.register` (or
  returned, by its annotation, by a registered factory) -- so a layer registered by anyone is known;
- its **channel count** is ``num_features`` or ``num_channels`` (dim 1 of ``(N, C, *S)`` input), or its
  ``normalized_shape`` for the last-dims layers (LayerNorm, RMSNorm);
- it **keeps batch statistics** when it has ``running_mean``/``running_var`` slots (possibly ``None``)
  and is not an InstanceNorm (whose running statistics are averages of per-sample statistics, a
  different quantity). This is the BatchNorm family: BN, mean-only BN, SyncBN, Batch Renorm, the BN
  part of Switchable and Batch-Instance Norm, Cross-Iteration BN.

Also the one module-replacement walker that :func:`~normzoo.tools.convert`, :func:`~normzoo.tools.fold`
and :func:`~normzoo.tools.convert_sync` share.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase as _TorchNormBase
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

_TORCH_NORMS: Tuple[type, ...] = tuple(
    t for t in (_TorchNormBase, nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None
)
_CHANNEL_ATTRS = ("num_features", "num_channels")


def _normzoo_bases() -> Tuple[type, ...]:
    from normzoo.nn._base import NormBase

    return (NormBase,)


def _normzoo_instance_norm() -> type:
    from normzoo.nn.group import _InstanceNorm

    return _InstanceNorm


_REGISTERED: Dict[int, Tuple[type, ...]] = {}


def _registered_classes() -> Tuple[type, ...]:
    """Classes registered with :func:`normzoo.registry.register`, and the classes registered factories declare
    they return (``def _make_gn(...) -> GroupNorm``). Cached per registry size."""
    import typing

    from normzoo import registry

    names = registry.available()
    key = len(registry.aliases())
    if key not in _REGISTERED:
        found = set()
        for name in names:
            factory = registry.lookup(name)
            if isinstance(factory, type):
                found.add(factory)
                continue
            try:
                ret = typing.get_type_hints(factory).get("return")
            except Exception:  # unresolvable annotations: the factory's class stays unknown
                ret = None
            if isinstance(ret, type) and issubclass(ret, nn.Module):
                found.add(ret)
        _REGISTERED.clear()
        _REGISTERED[key] = tuple(found)
    return _REGISTERED[key]


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (see the module docstring for the rule)."""
    return isinstance(module, _TORCH_NORMS + _normzoo_bases() + _registered_classes())


def is_channel_first(module: nn.Module) -> bool:
    """Whether the layer normalizes ``(N, C, *S)`` input with ``C`` in dim 1 (it has a channel count)."""
    return any(isinstance(getattr(module, a, None), int) for a in _CHANNEL_ATTRS)


def num_channels(module: nn.Module) -> Optional[int]:
    """``num_features`` or ``num_channels``, or None for a layer without a channel count."""
    for a in _CHANNEL_ATTRS:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def is_instance_norm(module: nn.Module) -> bool:
    return isinstance(module, (_TorchInstanceNorm, _normzoo_instance_norm()))


def keeps_batch_stats(module: nn.Module) -> bool:
    """Whether the layer belongs to the BatchNorm family (running statistics of its input over the batch).

    True when it has a ``running_mean`` or ``running_var`` slot (a tensor, or ``None`` for
    ``track_running_stats=False``) and is not an InstanceNorm.
    """
    if not is_norm(module) or is_instance_norm(module):
        return False
    return hasattr(module, "running_mean") or hasattr(module, "running_var")


def running_stats(module: nn.Module) -> Dict[str, Tensor]:
    """The running-statistics buffers the layer holds: those of ``running_mean``, ``running_var``,
    ``num_batches_tracked`` that are tensors."""
    out = {}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(module, name, None)
        if isinstance(t, Tensor):
            out[name] = t
    return out


def layer_dim(module: nn.Module) -> Optional[int]:
    """The spatial dimensionality a layer's class declares by its name (``BatchNorm2d`` -> 2), else None."""
    m = re.search(r"([123])[dD]$", type(module).__name__)
    return int(m.group(1)) if m else None


def reference_tensor(module: nn.Module, fallback: Optional[nn.Module] = None) -> Optional[Tensor]:
    """A floating-point parameter or buffer of ``module`` (else of ``fallback``): where its data lives."""
    for m in (module, fallback):
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                return t
    return None


def describe(name: str, module: nn.Module) -> str:
    """``"BatchNorm2d at 'layer1.0.bn1'"`` (the root module is called ``'<model>'``)."""
    return f"{type(module).__name__} at {name!r}" if name else f"{type(module).__name__} (the model itself)"


def module_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name under which each module (by id) is registered in ``model``, duplicates included."""
    names: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


Replacer = Callable[[str, nn.Module], Optional[nn.Module]]


def replace_modules(model: nn.Module, replacer: Replacer) -> nn.Module:
    """Replace submodules of ``model`` (the root included) in place and return the (possibly new) root.

    ``replacer(name, module)`` returns the replacement or ``None`` to keep the module; it is called once per
    distinct module (a module shared by several parents is replaced by one shared new module). Containers
    (``Sequential``, ``ModuleList``, ``ModuleDict``) and modules reached by attribute are all covered: the
    new module is registered under the same name in the same parent. The children of a replaced module are
    not visited.
    """
    memo: Dict[int, Optional[nn.Module]] = {}

    def visit(name: str, module: nn.Module) -> nn.Module:
        key = id(module)
        if key not in memo:
            memo[key] = replacer(name, module)
            if memo[key] is None:
                for child_name, child in list(module._modules.items()):
                    if child is None:
                        continue
                    new = visit(f"{name}.{child_name}" if name else child_name, child)
                    if new is not child:
                        module._modules[child_name] = new
        new = memo[key]
        return module if new is None else new

    return visit("", model)


def copy_requires_grad(new: nn.Module, old: nn.Module) -> None:
    """Give ``new``'s parameters the ``requires_grad`` of ``old``'s parameters of the same name."""
    old_params = dict(old.named_parameters(recurse=False))
    for pname, p in new.named_parameters(recurse=False):
        if pname in old_params:
            p.requires_grad_(old_params[pname].requires_grad)


def match_placement(new: nn.Module, old: nn.Module, model: nn.Module) -> nn.Module:
    """Move ``new`` to the device and floating dtype of ``old`` (or of ``model`` if ``old`` holds no tensor),
    and give it ``old``'s train/eval mode."""
    ref = reference_tensor(old, model)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    return new


__all__ = [
    "is_norm",
    "is_channel_first",
    "num_channels",
    "is_instance_norm",
    "keeps_batch_stats",
    "running_stats",
    "layer_dim",
    "describe",
    "module_names",
    "replace_modules",
    "copy_requires_grad",
    "match_placement",
]
