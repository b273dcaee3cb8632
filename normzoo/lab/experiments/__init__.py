"""The lab's experiments, one module each, in the order the report shows them.

Each module defines ``EXPERIMENT``, a :class:`normzoo.lab.runner.Experiment`.
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from ..runner import Experiment

#: experiment names in report order (each is a module of this package)
ORDER: List[str] = [
    "saturation", "init_scale", "batch_size", "learning_rate", "regularization", "inference_stats",
    "batch_renorm", "weight_norm", "switchable", "batch_instance", "cross_iteration", "spectral_norm",
    "covariate_shift",
]


def get(name: str) -> Experiment:
    """The experiment called ``name`` (ValueError naming the known ones otherwise)."""
    if name not in ORDER:
        raise ValueError(f"normzoo lab: unknown experiment {name!r}; expected one of: {', '.join(ORDER)}")
    return importlib.import_module(f"{__name__}.{name}").EXPERIMENT


def all_experiments() -> Dict[str, Experiment]:
    return {name: get(name) for name in ORDER}
