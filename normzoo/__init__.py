"""normzoo: Batch Normalization and every normalization method that followed it.

Doors into the library (each imported on first use, so ``import normzoo.reference`` never loads torch):

- :mod:`normzoo.nn` and :mod:`normzoo.functional` -- PyTorch layers, drop-in with ``torch.nn``;
- :func:`normzoo.create` -- any layer by a short name, channel count first;
- :mod:`normzoo.stats` -- the statistics core: moments ``(count, mean, M2)`` that merge exactly;
- :mod:`normzoo.reference` -- NumPy forward/backward pairs (CS231n signatures) and a gradient checker;
- :mod:`normzoo.tools` -- convert, fold, recalibrate, freeze, synchronize across processes;
- ``normzoo lab`` and ``normzoo bench`` -- the experiments and the benchmark (:mod:`normzoo.lab`,
  :mod:`normzoo.bench`).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {"nn", "functional", "stats", "reference", "tools", "lab", "bench", "registry"}
_FROM_REGISTRY = {"create", "available", "register"}

__all__ = sorted(_SUBMODULES | _FROM_REGISTRY | {"__version__"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"normzoo.{name}")
    if name in _FROM_REGISTRY:
        return getattr(importlib.import_module("normzoo.registry"), name)
    raise AttributeError(f"module 'normzoo' has no attribute {name!r}")


def __dir__() -> list:
    return __all__
