"""Autograd helpers shared by normzoo's ``torch.autograd.Function`` ops.

:func:`lean_apply` is ``Function.apply`` without torch's Python layer in front of its C++ entry point when no
``torch.func`` transform is active. That layer (a check for ``setup_context``, the transforms' state, and a
pass over the arguments for tensors left by finished transforms) costs about 6 us per call with warm caches
and about 8 us in a layer's step after the thread has slept, a tenth of a fused layer's Python before its
kernel. Under a transform the public ``apply`` runs, as it must.

:func:`once_differentiable` is ``torch.autograd.function.once_differentiable`` without its cost on the
usual backward. torch's version enters a ``no_grad`` block around every call, about 7 us per backward,
which at small layer sizes is a visible part of a normalization layer's step. Outside ``create_graph``
the autograd engine already runs a node's backward with grad mode off, so nothing needs doing there;
under ``create_graph`` (grad mode on) torch's version runs, and a second derivative fails with its error.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor
from torch.autograd import function as _function

_F = TypeVar("_F", bound=Callable[..., Any])

#: The C++ ``apply`` that ``torch.autograd.Function.apply`` ends in (None if this torch has none by that name).
_C_APPLY = torch._C._FunctionBase.__dict__.get("apply") if hasattr(torch._C, "_FunctionBase") else None


def lean_apply(fn: type) -> Callable[..., Any]:
    """``fn.apply`` for an ``autograd.Function`` subclass that defines no ``setup_context``, calling torch's C++
    entry point directly where no functorch transform is active (see the module doc)."""
    defined = getattr(_function, "_is_setup_context_defined", None)
    if _C_APPLY is None or defined is None or defined(fn.setup_context):  # type: ignore[attr-defined]
        return fn.apply  # type: ignore[attr-defined]
    direct = _C_APPLY.__get__(None, fn)
    public = fn.apply  # type: ignore[attr-defined]
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args: Any) -> Any:
        return public(*args) if transforms_active() else direct(*args)

    return apply


def once_differentiable(backward: _F) -> _F:
    """Mark an ``autograd.Function``'s ``backward`` as not differentiable again (its saved statistics are
    constants): with ``create_graph=True`` the gradients it returns refuse a second derivative, with
    torch's own error; otherwise the backward runs as it is, with no extra work."""
    guarded = _function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx: Any, *args: Any) -> Any:
        if torch.is_grad_enabled():
            return guarded(ctx, *args)
        return backward(ctx, *args)

    return wrapper  # type: ignore[return-value]


def grad_as(grad: Optional[Tensor], like: Any) -> Optional[Tensor]:
    """A parameter's gradient as the kernels wrote it, in the parameter's dtype (``like``: the parameter or its
    dtype): no call where it already is (they write float32, float64 and bfloat16 parameters' gradients in
    their own type, others in the arithmetic type); ``None`` where ``grad`` or ``like`` is ``None``."""
    if grad is None or like is None:
        return None
    dtype = like if isinstance(like, torch.dtype) else like.dtype
    return grad if grad.dtype == dtype else grad.to(dtype)


__all__ = ["once_differentiable", "lean_apply", "grad_as"]
