"""Weight Normalization (Salimans & Kingma 2016) and its data-dependent initialization.

Weight normalization reparametrizes a weight ``w`` by a magnitude ``g`` and a direction ``v``:

    w = g * v / ||v||

where the norm is taken over every dim of ``v`` except ``dim`` (one ``g`` per output feature with the
default ``dim=0``), or over the whole tensor with ``dim=None``. Gradient descent on ``(g, v)`` instead of
``w`` decouples the length of each weight vector from its direction, which conditions the optimization
much as BatchNorm's division by the standard deviation does, at a cost proportional to the number of
weights instead of the number of activations, and without any dependence on the batch.

The paper pairs it with **mean-only batch normalization** (:class:`normzoo.nn.MeanOnlyBatchNorm2d` and
friends, section 4): weight normalization fixes the scale of the pre-activations, mean-only BN removes
their mean, and the noise that batch statistics add is gentler than full BatchNorm's.

Implementation: a :mod:`torch.nn.utils.parametrize` parametrization, so it applies to any module with a
weight (Linear, ConvNd, ConvTransposeNd, Embedding, ...) and works with ``parametrize.cached()`` (compute
the weight once for several calls). See :func:`weight_norm`, :func:`remove_weight_norm` and
:func:`data_dependent_init`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo import _checks
from normzoo.stats import moments


def _whole_tensor(dim: Optional[int]) -> bool:
    # torch's convention, kept for checkpoint compatibility: dim=-1 means "the whole tensor", not "the last dim".
    return dim is None or dim == -1


def _norm_except_dim(v: Tensor, dim: Optional[int]) -> Tensor:
    """``||v||_2`` over every dim but ``dim`` (kept as size 1), or over all of ``v`` (a 0-dim tensor)."""
    if _whole_tensor(dim):
        return torch.linalg.vector_norm(v)
    d = dim % v.dim()  # type: ignore[operator]
    others = [i for i in range(v.dim()) if i != d]
    return torch.linalg.vector_norm(v, dim=others, keepdim=True) if others else v.abs()


class WeightNorm(nn.Module):
    r"""The weight-normalization parametrization ``(g, v) -> g * v / ||v||``.

    Registered by :func:`weight_norm`; ``original0`` is ``g`` (shape of ``w`` with every dim but ``dim`` of
    size 1, or a 0-dim tensor for ``dim=None``) and ``original1`` is ``v`` (shape of ``w``), exactly as
    :func:`torch.nn.utils.parametrizations.weight_norm` stores them, so checkpoints move between the two.

    A zero direction (``||v|| == 0``, e.g. a weight initialised to zero) gives ``w = 0`` instead of torch's
    NaN: a zero norm is replaced by 1 (``w = g * 0``); any nonzero norm is used as it is.
    """

    def __init__(self, dim: Optional[int] = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        norm = _norm_except_dim(v, self.dim)
        norm = torch.where(norm == 0, torch.ones_like(norm), norm)
        return v * (g / norm)

    def right_inverse(self, weight: Tensor) -> Tuple[Tensor, Tensor]:
        """``g = ||w||``, ``v = w``: the parametrized weight equals ``weight`` at registration."""
        return _norm_except_dim(weight, self.dim), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _weight_norm_classes() -> Tuple[type, ...]:
    """Parametrizations that compute weight normalization: normzoo's and torch's (same keys and semantics)."""
    torch_cls = getattr(torch.nn.utils.parametrizations, "_WeightNorm", None)
    return (WeightNorm,) if torch_cls is None else (WeightNorm, torch_cls)


def is_weight_normed(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is weight-normalized by normzoo's or torch's parametrization (alone)."""
    if not parametrize.is_parametrized(module, name):
        return False
    plist = module.parametrizations[name]  # type: ignore[index]
    return len(plist) == 1 and isinstance(plist[0], _weight_norm_classes())


def _old_style_hook(module: nn.Module, name: str) -> bool:
    from torch.nn.utils.weight_norm import WeightNorm as _OldWeightNorm

    return any(isinstance(h, _OldWeightNorm) and h.name == name for h in module._forward_pre_hooks.values())


def _legacy_keys_hook(name: str) -> Callable[..., None]:
    """Load-state-dict pre-hook: accept the old ``torch.nn.utils.weight_norm`` keys ``<name>_g``/``<name>_v``."""

    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if is_weight_normed(module, name) and g_key in state_dict and v_key in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)

    return hook


def weight_norm(module: nn.Module, name: str = "weight", dim: Optional[int] = 0) -> nn.Module:
    r"""Weight-normalize ``module.<name>``: ``w = g * v / ||v||`` (Salimans & Kingma 2016).

    Args:
        module: any module holding a weight tensor ``name`` (Linear, ConvNd, ConvTransposeNd, ...).
        name: the parameter to reparametrize.
        dim: the dim that keeps one magnitude per index; the norm runs over all the others. ``0`` (default):
            one ``g`` per output feature of Linear/ConvNd (for ConvTransposeNd, whose weight is
            ``(in, out/groups, *k)``, pass ``dim=1`` for per-output-channel magnitudes). ``None``: one ``g``
            for the whole tensor. As in torch, ``dim=-1`` also means the whole tensor (not the last dim);
            write the last dim as ``w.dim() - 1``. Other negative dims count from the end.

    Returns:
        ``module``, with ``module.parametrizations.<name>.original0`` (``g``) and ``.original1`` (``v``).

    Relation to torch: identical in semantics and state_dict keys to
    :func:`torch.nn.utils.parametrizations.weight_norm`, so a torch weight-normed module's state_dict loads
    into a normzoo one and back. The older :func:`torch.nn.utils.weight_norm` (a forward pre-hook, deprecated)
    stores the same two tensors as ``<name>_g`` and ``<name>_v``; those keys are accepted too when loading.
    A module still carrying the old hook must be freed of it first (``torch.nn.utils.remove_weight_norm``).

    Pair it with mean-only batch normalization (``normzoo.nn.MeanOnlyBatchNorm*``) as the paper does, and
    initialize with :func:`data_dependent_init`.

    Example::

        >>> conv = weight_norm(nn.Conv2d(3, 16, 3))
        >>> conv.parametrizations.weight.original0.shape      # g
        torch.Size([16, 1, 1, 1])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_norm: expected an nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight_norm: {type(module).__name__} has no parameter or buffer named {name!r}")
    if _old_style_hook(module, name):
        raise ValueError(
            f"weight_norm: {type(module).__name__}.{name} already carries the old torch.nn.utils.weight_norm hook; "
            "call torch.nn.utils.remove_weight_norm(module) first"
        )
    if parametrize.is_parametrized(module, name):
        raise ValueError(
            f"weight_norm: {type(module).__name__}.{name} is already parametrized "
            f"({[type(p).__name__ for p in module.parametrizations[name]]}); weight normalization must come first"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight_norm: {type(module).__name__}.{name} must be floating point, got {weight.dtype}")
    if dim is not None and not _whole_tensor(dim):
        if isinstance(dim, bool) or not isinstance(dim, int) or not -weight.dim() <= dim < weight.dim():
            raise ValueError(
                f"weight_norm: dim must be None or an int in [{-weight.dim()}, {weight.dim() - 1}] for a weight of "
                f"shape {tuple(weight.shape)}, got {dim!r}"
            )
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)
    module.register_load_state_dict_pre_hook(_legacy_keys_hook(name))
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo :func:`weight_norm`: ``module.<name>`` becomes a plain parameter holding ``g * v / ||v||``.

    Works on normzoo's and on torch's ``parametrizations.weight_norm``. The new parameter is a fresh leaf:
    rebuild the optimizer (its state for ``g`` and ``v`` does not carry over).
    """
    if not is_weight_normed(module, name):
        raise ValueError(f"remove_weight_norm: {type(module).__name__}.{name} is not weight-normalized (alone)")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


# -- data-dependent initialization ----------------------------------------------------------------------


def _layout(qualname: str, module: nn.Module, name: str) -> Tuple[int, int]:
    """(number of output features, dim of the weight that indexes them), checked against ``g``'s shape."""
    if isinstance(module, nn.Linear):
        features, wdim = module.out_features, 0
    elif isinstance(module, nn.modules.conv._ConvNd):
        features, wdim = module.out_channels, (1 if module.transposed else 0)
        if module.transposed and module.groups != 1:
            raise ValueError(
                f"data_dependent_init: {qualname} ({type(module).__name__}, groups={module.groups}) has no "
                "per-output-channel weight-norm magnitude (its weight is (in, out/groups, *k))"
            )
    else:
        raise TypeError(
            f"data_dependent_init: supports weight-normalized nn.Linear, nn.ConvNd and nn.ConvTransposeNd, "
            f"got {type(module).__name__} at {qualname}"
        )
    g = module.parametrizations[name].original0  # type: ignore[index]
    if g.numel() != features or (features > 1 and (g.dim() <= wdim or g.shape[wdim] != features)):
        raise ValueError(
            f"data_dependent_init: {qualname} needs one weight-norm magnitude per output feature "
            f"(weight_norm(..., dim={wdim})), got g of shape {tuple(g.shape)} for {features} features"
        )
    return features, wdim


def _feature_axis(module: nn.Module, out: Tensor) -> int:
    """The axis of the output features in ``out``: last for Linear, 1 for batched conv, 0 for unbatched."""
    if isinstance(module, nn.Linear):
        return out.dim() - 1
    return 1 if out.dim() == module.weight.dim() else 0


class _InitHooks:
    """The hooks that initialize one weight-normalized module on its first call."""

    def __init__(self, qualname: str, module: nn.Module, name: str, init_scale: float, eps: float) -> None:
        self.qualname, self.module, self.name = qualname, module, name
        self.init_scale, self.eps = init_scale, eps
        self.features, _ = _layout(qualname, module, name)
        self.done = False
        self.handles = [
            module.register_forward_pre_hook(self.before),
            module.register_forward_hook(self.after),
        ]

    @property
    def g(self) -> Tensor:
        return self.module.parametrizations[self.name].original0  # type: ignore[index]

    def bias(self) -> Optional[Tensor]:
        b = getattr(self.module, "bias", None)
        return b if isinstance(b, Tensor) else None

    def before(self, module: nn.Module, args: Any) -> None:
        # g = 1 and b = 0: the module then outputs t = (v . x) / ||v||, the paper's pre-activation.
        self.g.fill_(1.0)
        b = self.bias()
        if b is not None:
            b.zero_()

    def after(self, module: nn.Module, args: Any, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"data_dependent_init: {self.qualname} returned {type(out).__name__}, expected a Tensor")
        axis = _feature_axis(module, out)
        dims = [d for d in range(out.dim()) if d != axis]
        count = math.prod(out.shape[d] for d in dims)
        if count < 2:
            raise ValueError(
                f"data_dependent_init: {self.qualname} needs more than one value per output feature, got output of "
                f"shape {tuple(out.shape)}"
            )
        stats = moments(out, dims)
        mu, var = stats.mean, stats.var()
        dead = var <= 0
        scale = torch.where(dead, torch.ones_like(var), torch.rsqrt(var + self.eps)) * self.init_scale
        if bool(dead.any()):
            warnings.warn(
                f"data_dependent_init: {int(dead.sum())} of {self.features} output features of {self.qualname} are "
                "constant on the init batch; their magnitude g is set to init_scale instead of init_scale/sigma",
                RuntimeWarning,
                stacklevel=2,
            )
        g = self.g
        g.copy_(scale.reshape(g.shape).to(g.dtype))
        shape = [1] * out.dim()
        shape[axis] = self.features
        y = out * scale.reshape(shape).to(out.dtype)
        b = self.bias()
        if b is not None:
            shift = -mu * scale
            b.copy_(shift.reshape(b.shape).to(b.dtype))
            y = y + shift.reshape(shape).to(out.dtype)
        self.done = True
        self.remove()
        return y

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def data_dependent_init(
    model: nn.Module,
    batch: Any,
    init_scale: float = 1.0,
    eps: float = 1e-8,
    name: str = "weight",
) -> nn.Module:
    r"""The data-dependent initialization of weight normalization (Salimans & Kingma 2016, section 3).

    Runs ``model`` once on ``batch`` (no gradients). Each weight-normalized ``Linear``/``ConvNd``/
    ``ConvTransposeNd`` in ``model`` (``model`` itself included), at its first call and in execution order,
    computes its pre-activation with ``g = 1``, ``b = 0``, that is ``t = v . x / ||v||``, takes its mean
    ``mu`` and standard deviation ``sigma`` per output feature over the batch (and spatial positions), and
    sets

        g = init_scale / sigma,        b = -mu * init_scale / sigma,

    so that its output on this batch is ``init_scale * (t - mu) / sigma``: zero mean and variance
    ``init_scale^2`` per feature. The layer's corrected output is what the next layers see, so the whole
    network is initialized in one pass. ``v`` keeps its value (initialize it beforehand, e.g. the paper's
    ``N(0, 0.05)``).

    Args:
        model: a module or a model containing weight-normalized modules (see :func:`weight_norm`, with
            ``dim=0``; ``dim=1`` for ConvTransposeNd). torch's ``parametrizations.weight_norm`` counts too.
        batch: the init batch: a tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a mapping
            (``model(**batch)``). Use a large enough batch: the statistics come from it alone.
        init_scale: the target standard deviation of every pre-activation.
        eps: added to the variance: ``sigma = sqrt(var + eps)``.
        name: the weight-normalized parameter.

    The model's train/eval mode is left as it is (a mean-only BN after a layer runs in whichever mode the
    model is in). A layer without bias gets only its scale (its mean is left to what follows, e.g. a
    mean-only BN). A feature constant over the batch (sigma = 0) keeps ``g = init_scale`` and a warning is
    raised; the variance uses the guarded moments of :func:`normzoo.stats.moments`. A weight-normalized
    module that the forward pass never calls keeps its values, with a warning naming it.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"data_dependent_init: expected an nn.Module, got {type(model).__name__}")
    if not init_scale > 0:
        raise ValueError(f"data_dependent_init: init_scale must be positive, got {init_scale!r}")
    _checks.check_eps("data_dependent_init", eps)
    targets = [(q or type(model).__name__, m) for q, m in model.named_modules() if is_weight_normed(m, name)]
    if not targets:
        raise ValueError(
            f"data_dependent_init: no weight-normalized {name!r} in {type(model).__name__}; apply "
            "normzoo.nn.weight_norm first"
        )
    for qualname, m in targets:
        _layout(qualname, m, name)  # unsupported modules and layouts fail here, before anything changes
    hooks: List[_InitHooks] = []
    try:
        with torch.no_grad():
            hooks = [_InitHooks(q, m, name, float(init_scale), float(eps)) for q, m in targets]
            if isinstance(batch, Tensor):
                model(batch)
            elif isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                raise TypeError(
                    f"data_dependent_init: batch must be a Tensor, a tuple/list or a mapping, got {type(batch).__name__}"
                )
    finally:
        for h in hooks:
            h.remove()
    missed = [h.qualname for h in hooks if not h.done]
    if missed:
        warnings.warn(
            f"data_dependent_init: these weight-normalized modules were not called by the forward pass, so their "
            f"g and bias keep their values: {missed}",
            RuntimeWarning,
            stacklevel=2,
        )
    return model


__all__ = ["WeightNorm", "weight_norm", "remove_weight_norm", "is_weight_normed", "data_dependent_init"]
