"""``normzoo bench``: time, bandwidth and saved memory of every layer, side by side with torch.nn.

Python use::

    from normzoo import bench
    result = bench.run(layers=["bn2d", "gn"], shapes=[(32, 64, 56, 56)], dtypes=["float32"])
    print(result.table())            # the readable report
    result.to_dict()                 # the same as JSON-ready data
    result.write("bench-results")    # results.json, results.txt, results.png

Modules: :mod:`~normzoo.bench.harness` (allocator, threads, interleaved timing, load),
:mod:`~normzoo.bench.memory` (bytes saved for backward), :mod:`~normzoo.bench.cases` (layers, baselines,
shapes), :mod:`~normzoo.bench.formulas` (paper-formula baselines), :mod:`~normzoo.bench.results` (rows and
derived figures), :mod:`~normzoo.bench.targets` (the issue's targets), :mod:`~normzoo.bench.report`
(table, JSON, plot), :mod:`~normzoo.bench.runner` (:func:`run`), :mod:`~normzoo.bench.cli`.
"""
from normzoo.bench.cases import LayerSpec, spec_for
from normzoo.bench.memory import SavedBytes, saved_for_backward
from normzoo.bench.results import Row, Timing
from normzoo.bench.runner import BenchResult, run

__all__ = ["run", "BenchResult", "Row", "Timing", "LayerSpec", "spec_for", "SavedBytes", "saved_for_backward"]
