"""Freeze BatchNorm layers so that ``model.train()`` cannot unfreeze them.

The trap: fine-tuning code often "freezes BN" with ``bn.eval()`` and ``requires_grad_(False)``, then calls
``model.train()`` at the start of every epoch -- which puts every BN back in training mode, so the running
statistics drift and the layers normalize with batch statistics again, silently. :func:`freeze` puts the
layers in eval mode *and* replaces their ``train`` method by one that records the requested mode but keeps
the layer in eval, so ``model.train()`` leaves them frozen. :func:`unfreeze` removes the override and
restores the ``requires_grad`` flags exactly, and the train/eval mode that was last requested (the mode
before :func:`freeze` unless ``train()``/``eval()`` was called since).

The frozen state is not part of the ``state_dict`` (it holds parameters and buffers only) and does not need
to be: a checkpoint of a frozen model loads into an unfrozen one and vice versa; call :func:`freeze` again
after building the model. ``copy.deepcopy`` and ``pickle``/``torch.save`` of the whole module keep it.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional

from torch import nn

from normzoo.tools import _layers

_STATE = "_normzoo_frozen"


class _FrozenTrain:
    """Replaces a frozen layer's ``train`` method: records the requested mode for :func:`unfreeze` and keeps
    the layer in eval. An object (not a bound function) so that ``pickle`` and ``copy.deepcopy`` keep it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {type(mode).__name__}")
        self.module.__dict__[_STATE]["requested"] = mode
        nn.Module.train(self.module, False)
        return self.module


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` froze this very module (not: whether some submodule is frozen)."""
    return _STATE in module.__dict__


def frozen_layers(model: nn.Module) -> List[str]:
    """Names of the frozen modules in ``model`` (``''`` for the root)."""
    return [name for name, m in model.named_modules() if is_frozen(m)]


def _default_selection(module: nn.Module) -> bool:
    return _layers.keeps_batch_stats(module)


def freeze(
    model: nn.Module,
    *,
    trainable_affine: bool = False,
    predicate: Optional[Callable[[nn.Module], bool]] = None,
) -> nn.Module:
    """Freeze the BatchNorm-family layers of ``model`` (in place) and return ``model``.

    Each selected layer is put in eval mode (it normalizes with its running statistics and no longer
    updates them), its ``train`` method is overridden so that a later ``model.train()`` keeps it in eval,
    and its own parameters (``weight``/``bias``) get ``requires_grad=False`` unless
    ``trainable_affine=True`` (then their flags are left as they are).

    ``predicate(module) -> bool`` selects other layers (default: the BatchNorm family, i.e. layers with
    running batch statistics; pass ``normzoo.tools.is_norm`` to freeze every normalization layer's affine
    parameters too). ``model`` may itself be a single layer. Freezing a frozen layer again keeps its
    original record (so :func:`unfreeze` still restores the state before the first freeze) and applies the
    new ``trainable_affine`` choice. A BatchNorm without running statistics (``track_running_stats=False``)
    normalizes with batch statistics even in eval; freezing it freezes its affine parameters only, and
    a warning says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: expected an nn.Module, got {type(model).__name__}")
    select = predicate if predicate is not None else _default_selection
    no_stats = []
    for name, m in model.named_modules():
        if not select(m):
            continue
        if not is_frozen(m):
            record: Dict[str, object] = {
                "requested": m.training,
                "requires_grad": {pn: p.requires_grad for pn, p in m.named_parameters(recurse=False)},
            }
            m.__dict__[_STATE] = record
            m.__dict__["train"] = _FrozenTrain(m)
        nn.Module.train(m, False)
        for pn, p in m.named_parameters(recurse=False):
            if trainable_affine:
                p.requires_grad_(m.__dict__[_STATE]["requires_grad"][pn])  # type: ignore[index]
            else:
                p.requires_grad_(False)
        if _layers.keeps_batch_stats(m) and not _layers.running_stats(m):
            no_stats.append(_layers.describe(name, m))
    if no_stats:
        warnings.warn(
            "freeze: these layers have no running statistics (track_running_stats=False) and keep normalizing "
            f"with batch statistics in eval; only their affine parameters are frozen: {', '.join(no_stats)}",
            stacklevel=2,
        )
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` on every frozen module of ``model`` (in place) and return ``model``.

    Restores each parameter's ``requires_grad`` as it was before freezing, removes the ``train`` override,
    and sets the train/eval mode last requested of the layer (by ``model.train()``/``model.eval()`` while it
    was frozen, or else the mode it had when frozen). Modules that are not frozen are left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze: expected an nn.Module, got {type(model).__name__}")
    for _, m in model.named_modules():
        if not is_frozen(m):
            continue
        record = m.__dict__.pop(_STATE)
        m.__dict__.pop("train", None)
        flags = record["requires_grad"]
        for pn, p in m.named_parameters(recurse=False):
            if pn in flags:
                p.requires_grad_(flags[pn])
        nn.Module.train(m, record["requested"])
    return model


__all__ = ["freeze", "unfreeze", "is_frozen", "frozen_layers"]
