"""Autograd helpers shared by normzoo's ``torch.autograd.Function`` ops.

:func:`once_differentiable` is ``torch.autograd.function.once_differentiable`` without its cost on the
usual backward. torch's version enters a ``no_grad`` block around every call, about 7 us per backward,
which at small layer sizes is a visible part of a normalization layer's step. Outside ``create_graph``
the autograd engine already runs a node's backward with grad mode off, so nothing needs doing there;
under ``create_graph`` (grad mode on) torch's version runs, and a second derivative fails with its error.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
from torch.autograd import function as _function

_F = TypeVar("_F", bound=Callable[..., Any])


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


__all__ = ["once_differentiable"]
