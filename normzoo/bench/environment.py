"""Process settings that must be fixed before ``torch`` is imported: the OpenMP wait policy.

torch's CPU kernels run in an OpenMP thread pool; at the end of every parallel region the threads wait
for each other. By default (GNU OpenMP) a waiting thread *spins*. On a machine whose cores other
processes also use, the spinning thread holds a core that the thread it waits for needs, and each
parallel region can cost a whole scheduler time slice (4 ms here): a 2-thread BatchNorm step measured
64 ms with the default policy and 7 ms with ``OMP_WAIT_POLICY=PASSIVE`` under the same load (both ~1.5 ms
on an idle machine). Passive waiting therefore makes the benchmark robust to other processes' load at
the price of a few microseconds per parallel region, which is why ``normzoo bench`` uses it unless told
otherwise. OpenMP reads the variable once, when torch loads it, so it can only be set before
``import torch``; :func:`omp_wait_info` reports what the run actually used.

This module imports nothing heavy, so that the command line can call it first.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional

OMP_WAIT_CHOICES = ("passive", "active", "inherit")

_requested: Dict[str, object] = {}


def set_omp_wait_policy(policy: Optional[str]) -> Dict[str, object]:
    """Set ``OMP_WAIT_POLICY`` for this process if ``torch`` is not imported yet.

    ``"passive"``/``"active"``: set it; ``"inherit"``: leave the environment alone; ``None``: keep a value
    the environment already has, else ``"passive"``. Returns :func:`omp_wait_info`.
    """
    if policy is not None and policy not in OMP_WAIT_CHOICES:
        raise ValueError(f"normzoo bench: omp wait policy must be one of {OMP_WAIT_CHOICES}, got {policy!r}")
    current = os.environ.get("OMP_WAIT_POLICY")
    if policy is None:
        policy = "inherit" if current else "passive"
    _requested.clear()
    _requested["requested"] = policy
    if policy != "inherit":
        if "torch" in sys.modules:
            _requested["detail"] = (f"requested {policy} but torch was already imported: OpenMP keeps "
                                    f"{current or 'its default (spin, then sleep)'}")
        else:
            os.environ["OMP_WAIT_POLICY"] = policy.upper()
            _requested["detail"] = f"OMP_WAIT_POLICY={policy.upper()} set before torch was imported"
    return omp_wait_info()


def omp_wait_info() -> Dict[str, object]:
    """The OpenMP wait policy this process runs with, as far as can be known, and how it came about."""
    value = os.environ.get("OMP_WAIT_POLICY")
    detail = _requested.get("detail") or (f"OMP_WAIT_POLICY={value} from the environment" if value else
                                          "OpenMP default (spin, then sleep)")
    return {"OMP_WAIT_POLICY": value, "requested": _requested.get("requested"), "detail": detail}


__all__ = ["OMP_WAIT_CHOICES", "set_omp_wait_policy", "omp_wait_info"]
