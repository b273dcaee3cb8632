"""``normzoo bench``: time, bandwidth and saved memory of every layer, side by side with torch.nn.

Python use::

    from normzoo import bench
    result = bench.run(layers=["bn2d", "gn"], shapes=[(32, 64, 56, 56)], dtypes=["float32"])
    print(result.table())            # the readable report
    result.to_dict()                 # the same as JSON-ready data
    result.write("bench-results")    # results.json, results.txt, results.png

Modules: :mod:`~normzoo.bench.harness` (allocator, threads, interleaved timing, load),
:mod:`~normzoo.bench.environment` (the OpenMP wait policy, set before torch loads),
:mod:`~normzoo.bench.memory` (bytes saved for backward), :mod:`~normzoo.bench.cases` (layers, baselines,
shapes), :mod:`~normzoo.bench.formulas` (paper-formula baselines), :mod:`~normzoo.bench.results` (rows and
derived figures), :mod:`~normzoo.bench.targets` (the issue's targets), :mod:`~normzoo.bench.report`
(table, JSON, plot), :mod:`~normzoo.bench.runner` (:func:`run`), :mod:`~normzoo.bench.cli`.

The names below load on first use, so that ``normzoo bench`` can fix the OpenMP wait policy before
anything imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run": "runner", "BenchResult": "runner", "Row": "results", "Timing": "results", "LayerSpec": "cases",
    "spec_for": "cases", "SavedBytes": "memory", "saved_for_backward": "memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"normzoo.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'normzoo.bench' has no attribute {name!r}")


def __dir__() -> list:
    return __all__
