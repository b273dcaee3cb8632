"""Fold BatchNorm into the preceding convolution or linear layer, for inference.

In eval mode a BatchNorm-family layer is a fixed per-channel affine map of its input,

    y = s * z + t,      s = gamma / sqrt(running_var + eps),      t = beta - running_mean * s

(mean-only BatchNorm: ``s = gamma``), and when its input ``z = W * x + b`` comes straight from a
``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` layer the two compose into one layer with

    W' = s * W   (scaled along the output channels),      b' = s * b + t,

which saves the normalization pass at inference. The scaled output channel is dim 0 of a convolution's or
linear layer's weight ``(out, in/groups, *k)``, and the second dim of a transposed convolution's weight
``(in, out/groups, *k)``, within each group. The arithmetic runs in float64, then rounds to the layer's
dtype.

Traps handled:

- **Training mode**: a BatchNorm in training mode normalizes with batch statistics, which no fixed map
  reproduces; folding it, or one without running statistics (``track_running_stats=False``), raises a
  ``ValueError`` naming the layer, and the model is left unchanged (everything is checked first).
- **Shared outputs**: a convolution whose output also feeds something else (a residual branch, a second
  head), a layer called twice, or a weight read elsewhere is not folded: that would change the other use.
- **Look-alikes**: the map is checked numerically against the layer itself on a random probe, so a
  layer with running statistics whose eval output is *not* that map (Switchable Norm, Batch-Instance
  Norm, which mix in per-sample statistics) is left in place, and a warning names it.
- **Reparametrized weights**: a weight under a ``torch.nn.utils.parametrize`` parametrization (normzoo's
  weight norm and spectral norm) is baked into a plain weight first, its value unchanged.

Which conv feeds which BatchNorm is read from a ``torch.fx`` symbolic trace of the model (any traceable
forward, with norm and conv/linear layers as leaves), or, for a forward that cannot be traced (data-
dependent control flow), from the adjacency of layers inside ``nn.Sequential`` containers.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo.tools import _layers

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _CONVS + _TRANSPOSED + (nn.Linear,)


def _plain_class(module: nn.Module) -> type:
    """The class of ``module``, seen through parametrization (which subclasses it dynamically)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def is_foldable_layer(module: nn.Module) -> bool:
    """Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (exact classes: a subclass may compute its weight or
    its output differently)."""
    return _plain_class(module) in _FOLDABLE


def is_fold_candidate(module: nn.Module) -> bool:
    """A normalization layer that may be an affine map of running statistics in eval: it has
    ``running_mean``, ``running_var`` and ``eps`` (InstanceNorm only when it tracks running statistics)."""
    if not _layers.is_norm(module):
        return False
    if not (hasattr(module, "running_mean") and hasattr(module, "running_var") and hasattr(module, "eps")):
        return False
    return not _layers.is_instance_norm(module) or getattr(module, "running_mean", None) is not None


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _probe_rank(layer: nn.Module) -> int:
    cls = _plain_class(layer)
    if cls is nn.Linear:
        return 2
    return 2 + int(cls.__name__[-2])


def running_affine(norm: nn.Module, rank: int = 4, name: str = "") -> Optional[Tuple[Tensor, Tensor]]:
    """The per-channel ``(s, t)`` (float64) with ``norm(z) == s * z + t`` in eval, or None if it is not that.

    Raises ``ValueError`` if ``norm`` is in training mode or has no running statistics. The candidate maps
    (standard BN, then mean-only BN; mean-only first for a layer that declares ``mean_only``) are checked
    against ``norm`` itself on a random probe of ``rank`` dims ``(2, C, 3, ...)`` drawn around its running
    statistics; hooks are not run.
    """
    where = _layers.describe(name, norm)
    if norm.training:
        raise ValueError(f"fold: {where} is in training mode, where it normalizes with batch statistics; "
                         "call model.eval() before folding")
    rm, rv = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if not isinstance(rm, Tensor) or not isinstance(rv, Tensor):
        raise ValueError(f"fold: {where} has no running statistics (track_running_stats=False): it normalizes "
                         "with batch statistics in eval too, so it cannot be folded")
    m, v = rm.double(), rv.double()
    w = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else torch.ones_like(m)
    b = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else torch.zeros_like(m)
    s_std = w / torch.sqrt(v + float(norm.eps))
    candidates = [(s_std, b - m * s_std), (w, b - m * w)]
    if _mean_only(norm):
        candidates.reverse()
    gen = torch.Generator().manual_seed(0)
    c = m.numel()
    z = torch.randn((2, c) + (3,) * (rank - 2), generator=gen, dtype=torch.float64)
    view = (1, c) + (1,) * (rank - 2)
    z = (z * v.clamp_min(1e-12).sqrt().cpu().view(view) + m.cpu().view(view)).to(device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        y = norm.forward(z).double()
    zd = z.double()
    low = rm.dtype not in (torch.float32, torch.float64)
    for s, t in candidates:
        pred = zd * s.view(view) + t.view(view)
        scale = float(pred.abs().max()) if pred.numel() else 0.0
        if torch.allclose(y, pred, rtol=3e-2 if low else 1e-3, atol=(3e-2 if low else 1e-4) * (1 + scale)):
            return s, t
    return None


def _mean_only(norm: nn.Module) -> bool:
    from normzoo.nn.batch import _MeanOnlyBatchNorm

    return isinstance(norm, _MeanOnlyBatchNorm) or bool(getattr(norm, "mean_only", False))


def _check_weight(layer: nn.Module, name: str = "") -> None:
    if parametrize.is_parametrized(layer, "weight"):
        return
    if not isinstance(layer._parameters.get("weight"), nn.Parameter):
        raise ValueError(f"fold: the weight of {_layers.describe(name, layer)} is not a plain parameter (it is "
                         "computed, e.g. by the deprecated torch.nn.utils.weight_norm hooks); remove that first")


def fold_into(layer: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module:
    """Compose ``layer`` (conv, transposed conv or linear) with the per-output-channel map ``y -> scale * y + shift``.

    In place: the weight is scaled along the output channels (within each group for a transposed
    convolution), the bias becomes ``scale * bias + shift`` (created if the layer had none, trainable like
    the weight). A parametrized weight is baked into a plain one first. Returns ``layer``.
    """
    cls = _plain_class(layer)
    if cls not in _FOLDABLE:
        raise TypeError(f"fold_into: expected Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, "
                        f"got {type(layer).__name__}")
    _check_weight(layer)
    out = _out_features(layer)
    if scale.shape != (out,) or shift.shape != (out,):
        raise ValueError(f"fold_into: {type(layer).__name__} has {out} output channels, got scale of shape "
                         f"{tuple(scale.shape)} and shift of shape {tuple(shift.shape)}")
    for pname in ("weight", "bias"):
        if parametrize.is_parametrized(layer, pname):
            parametrize.remove_parametrizations(layer, pname, leave_parametrized=True)
    weight = layer.weight
    s = scale.to(device=weight.device, dtype=torch.float64)
    t = shift.to(device=weight.device, dtype=torch.float64)
    w = weight.detach().double()
    if cls in _TRANSPOSED:
        g = layer.groups
        k = w.shape[2:]
        w = (w.reshape(g, w.shape[0] // g, w.shape[1], *k) * s.view(g, 1, -1, *([1] * len(k)))).reshape(weight.shape)
    else:
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s)
    with torch.no_grad():
        weight.copy_(w)
        if layer.bias is not None:
            layer.bias.copy_(bias * s + t)
        else:
            layer.bias = nn.Parameter((bias * s + t).to(weight.dtype), requires_grad=weight.requires_grad)
    return layer


# -- finding the pairs -------------------------------------------------------------------------------
class _FoldTracer(torch.fx.Tracer):
    """Keeps norm and conv/linear layers as leaves (normzoo's modules would otherwise be traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _layers.is_norm(m) or is_foldable_layer(m) or super().is_leaf_module(m, module_qualified_name)


def _pairs_fx(model: nn.Module) -> List[Tuple[str, str]]:
    graph = _FoldTracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_fold_candidate(modules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        if not is_foldable_layer(modules[prev.target]):
            continue
        if len(prev.users) != 1 or calls[prev.target] != 1 or calls[node.target] != 1:
            continue  # the layer's output is used elsewhere too, or a layer is called twice
        if any(a == prev.target or a.startswith(prev.target + ".") for a in attrs):
            continue  # the forward reads the layer's weight directly
        pairs.append((str(prev.target), str(node.target)))
    return pairs


def _pairs_sequential(model: nn.Module) -> List[Tuple[str, str]]:
    names = _layers.module_names(model)
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        items = [(n, m) for n, m in seq._modules.items() if m is not None]
        for (n1, a), (n2, b) in zip(items, items[1:]):
            if is_foldable_layer(a) and is_fold_candidate(b) and len(names[id(a)]) == 1 and len(names[id(b)]) == 1:
                pairs.append((f"{prefix}.{n1}" if prefix else n1, f"{prefix}.{n2}" if prefix else n2))
    return pairs


def find_fold_pairs(model: nn.Module, method: str = "auto") -> List[Tuple[str, str]]:
    """``(layer_name, norm_name)`` of the conv/linear layers whose output feeds only a BatchNorm-family layer.

    ``method``: ``"fx"`` (symbolic trace; raises if the model cannot be traced), ``"sequential"``
    (adjacency inside ``nn.Sequential``), or ``"auto"`` (fx, else sequential).
    """
    if method not in ("auto", "fx", "sequential"):
        raise ValueError(f"fold: method must be 'auto', 'fx' or 'sequential', got {method!r}")
    if method == "sequential":
        return _pairs_sequential(model)
    try:
        return _pairs_fx(model)
    except Exception:
        if method == "fx":
            raise
        return _pairs_sequential(model)


def fold(model: nn.Module, *, inplace: bool = True, method: str = "auto") -> nn.Module:
    """Fold every eval-mode BatchNorm-family layer that directly follows a conv/linear layer into it.

    Each folded norm layer is replaced by ``nn.Identity`` and its map moved into the layer before it (see
    the module docstring for the formula, the rules and the traps). ``inplace=False`` folds a deep copy and
    leaves ``model`` alone. Returns the model. Raises ``ValueError`` (model unchanged) when a norm layer to
    fold is in training mode or has no running statistics; warns about conv-norm pairs left in place
    because the norm layer is not an affine map of its running statistics in eval.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    plan = []
    skipped = []
    for lname, nname in find_fold_pairs(model, method):
        layer, norm = modules[lname], modules[nname]
        _check_weight(layer, lname)
        coeffs = running_affine(norm, _probe_rank(layer), nname)
        out = _out_features(layer)
        if coeffs is None or coeffs[0].numel() != out:
            why = "not an affine map of its running statistics" if coeffs is None else \
                f"{coeffs[0].numel()} channels after {out} outputs"
            skipped.append(f"{_layers.describe(nname, norm)} ({why})")
            continue
        plan.append((layer, norm, coeffs))
    folded = set()
    for layer, norm, (s, t) in plan:
        fold_into(layer, s, t)
        folded.add(id(norm))
    if skipped:
        warnings.warn(f"fold: left in place: {', '.join(skipped)}", stacklevel=2)
    return _layers.replace_modules(model, lambda name, m: nn.Identity() if id(m) in folded else None)


__all__ = ["fold", "fold_into", "find_fold_pairs", "running_affine", "is_foldable_layer", "is_fold_candidate"]
