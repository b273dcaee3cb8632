"""Create any normalization layer by a short name: ``normzoo.create("gn", 64, groups=32)``.

Every normzoo module takes the channel count (``num_features`` / ``num_channels`` /
``normalized_shape``) as its first argument, so any norm can replace any other. Modules register
themselves with :func:`register`; :func:`available` lists the names.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, TypeVar

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_CANONICAL: Dict[str, str] = {}

T = TypeVar("T")


def register(*names: str) -> Callable[[T], T]:
    """Class (or factory) decorator: make it creatable as ``create(name, num_channels, **kwargs)``.

    The first name is the canonical one; the rest are aliases. Names are case-insensitive.
    """
    if not names:
        raise ValueError("register() needs at least one name")

    def deco(factory: T) -> T:
        canonical = names[0].lower()
        for n in names:
            key = n.lower()
            if key in _REGISTRY and _REGISTRY[key] is not factory:
                raise ValueError(f"normzoo.register: name {n!r} is already taken by {_REGISTRY[key]!r}")
            _REGISTRY[key] = factory  # type: ignore[assignment]
            _CANONICAL[key] = canonical
        return factory

    return deco


def _ensure_loaded() -> None:
    import normzoo.nn  # noqa: F401  (modules register on import)


def available() -> List[str]:
    """Canonical names accepted by :func:`create`, sorted."""
    _ensure_loaded()
    return sorted(set(_CANONICAL.values()))


def aliases() -> Dict[str, str]:
    """Every accepted name (aliases included) mapped to its canonical name."""
    _ensure_loaded()
    return dict(_CANONICAL)


def lookup(name: str) -> Callable[..., nn.Module]:
    """The class or factory registered under ``name`` (case-insensitive)."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"normzoo.create: name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"normzoo.create: unknown normalization {name!r}{hint} (available: {', '.join(available())})")
    return _REGISTRY[key]


def create(name: str, num_channels: Any, **kwargs: Any) -> nn.Module:
    """Make a normalization layer by name, channel count first.

    >>> create("bn2d", 64)                     # BatchNorm2d(64)
    >>> create("gn", 64, groups=32)            # GroupNorm(32, 64)
    >>> create("ln", 768)                      # LayerNorm(768)
    """
    return lookup(name)(num_channels, **kwargs)


def canonical_name(name: str) -> str:
    _ensure_loaded()
    return _CANONICAL[name.lower()]


__all__ = ["register", "create", "available", "aliases", "lookup", "canonical_name"]
