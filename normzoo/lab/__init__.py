"""``normzoo lab``: experiments that test what the normalization literature claims, with figures.

From Python::

    from normzoo.lab import run_experiment, list_experiments
    r = run_experiment("saturation", quick=True, seed=0)
    print(r.verdict, r.reason)
    print(r.numbers["summary"])

From the shell: ``normzoo lab`` (every quick experiment into ``normzoo-lab/``), ``normzoo lab list``,
``normzoo lab run NAME... [--full] [--seed N] [--out DIR]``, ``normzoo lab report DIR``.
"""
from __future__ import annotations

from typing import List

from .experiments import ORDER, get
from .runner import Experiment, Result, run_experiment, run_experiments

__all__ = ["run_experiment", "run_experiments", "list_experiments", "get", "Experiment", "Result", "ORDER"]


def list_experiments() -> List[Experiment]:
    """Every experiment, in report order."""
    return [get(name) for name in ORDER]
