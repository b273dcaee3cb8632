"""The benchmark's results: one :class:`Row` per (layer, shape, dtype, memory format), and what follows from it.

Derived quantities (all from medians measured in the same interleaved rounds):

* ``ratio_fb`` (and ``ratio_fwd`` where the baseline's forward was timed; ``run`` times its
  forward+backward only): baseline time / normzoo time (``> 1``: normzoo is faster).
* ``gbps_fwd = 2 * bytes / t_fwd`` and ``gbps_fb = 5 * bytes / t_fb``: effective bandwidth against the
  memory-traffic floor (forward reads ``x`` and writes ``y``; backward reads ``x`` and ``dy`` and writes
  ``dx``), ``bytes`` being one input-sized tensor.
* ``copy_gbps = 2 * bytes / t_copy``: the machine's copy bandwidth at the same size, measured in the same
  rounds; ``copy_fraction_fwd``/``copy_fraction_fb``: effective bandwidth as a fraction of it, and
  ``baseline_copy_fraction_fb`` the baseline's (so a speedup of ``k`` needs ``k`` times that fraction).
* ``empty_fraction``: the forward+backward of an autograd op that does no work on the same tensors
  (``empty_fb_s``) / normzoo's: the share of the step that is fixed cost, not traffic. A time target of ``T``
  then leaves ``T - empty_fb_s`` for the kernels, which would have to move the traffic floor at
  ``copy_needed_within(T)`` of the copy bandwidth.
* ``vs_bn``: normzoo forward+backward time / normzoo BatchNorm's at the same shape (BatchNorm family).
* ``bf16_vs_fp32``: for a bfloat16 row, its forward+backward time / the float32 row's (same element count,
  so this is the per-element ratio; ``<= 1``: bfloat16 is no slower).
* ``saved_allowance``: one input-sized tensor plus ``STAT_BYTES_PER_UNIT`` bytes per statistics unit, the
  bound that "input + O(N*C) statistics" is checked against. A unit is an (n, c) pair or a channel c for image
  layers, a row (n, l) or a feature d for sequence layers (:func:`stats_units`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from normzoo.bench.memory import SavedBytes

# 8 float64 (16 float32) values per statistics unit: the means, scales, mixing terms and partial sums a
# method may keep per (n, c) or per channel. A second full-size tensor costs prod(S) values per (n, c), and
# the units are at most 2 per (n, c) (a batch of one), so any spatial size above 32 (float32) still tells
# "statistics" from "another tensor".
STAT_BYTES_PER_UNIT = 64


def stats_units(kind: str, shape: Sequence[int]) -> int:
    """How many statistics a layer may keep: ``N*C + C`` for ``(N, C, *S)`` images (per sample and channel,
    and per channel: a batch of one still has BatchNorm's per-channel statistics beside the instance ones, as
    Switchable Norm keeps both), ``N*L + D`` for ``(N, L, D)`` (per row, and per feature)."""
    if kind == "sequence":
        return math.prod(shape[:-1]) + shape[-1]
    return shape[0] * shape[1] + shape[1]


@dataclass
class Timing:
    """Median forward and forward+backward seconds, and every timed round."""

    fwd_s: Optional[float] = None
    fb_s: Optional[float] = None
    fwd_runs: List[float] = field(default_factory=list)
    fb_runs: List[float] = field(default_factory=list)


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


@dataclass
class Row:
    """One measured case. Times are medians in seconds; ``error`` is set (and timings empty) if it failed."""

    layer: str
    kind: str
    shape: List[int]
    dtype: str
    memory_format: str
    baseline_kind: str
    baseline_label: str
    element_size: int
    normzoo: Timing = field(default_factory=Timing)
    baseline: Timing = field(default_factory=Timing)
    copy_s: Optional[float] = None
    #: forward+backward of an op that does no work, on the same tensors (the fixed cost of an autograd op), of the
    #: kind normzoo's layer is (``autograd``)
    empty_fb_s: Optional[float] = None
    #: where normzoo's layer runs its backward: ``"C++"`` (a compiled operator) or ``"Python"`` (an autograd.Function)
    autograd: Optional[str] = None
    reference_fb_s: Optional[float] = None
    fp32_fb_s: Optional[float] = None
    saved: Optional[SavedBytes] = None
    saved_baseline: Optional[SavedBytes] = None
    max_abs_diff: Optional[float] = None
    rounds: int = 0
    others_cores: Optional[float] = None
    cache_resident: bool = False
    note: str = ""
    error: Optional[str] = None
    #: ``"train"`` (the issue's targets) or ``"eval"``: the mode every module of the case ran in
    mode: str = "train"

    # ----- sizes ---------------------------------------------------------------------------------------
    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def tensor_bytes(self) -> int:
        return self.elements * self.element_size

    @property
    def saved_allowance(self) -> int:
        return self.tensor_bytes + STAT_BYTES_PER_UNIT * stats_units(self.kind, self.shape)

    # ----- derived -------------------------------------------------------------------------------------
    @property
    def ratio_fwd(self) -> Optional[float]:
        return _div(self.baseline.fwd_s, self.normzoo.fwd_s)

    @property
    def ratio_fb(self) -> Optional[float]:
        return _div(self.baseline.fb_s, self.normzoo.fb_s)

    @property
    def gbps_fwd(self) -> Optional[float]:
        return _div(2 * self.tensor_bytes / 1e9, self.normzoo.fwd_s)

    def _floor_gbps_fb(self, seconds: Optional[float]) -> Optional[float]:
        """The forward+backward traffic floor (5 x tensor bytes) moved in ``seconds``, in GB/s."""
        return _div(5 * self.tensor_bytes / 1e9, seconds)

    @property
    def gbps_fb(self) -> Optional[float]:
        return self._floor_gbps_fb(self.normzoo.fb_s)

    @property
    def copy_gbps(self) -> Optional[float]:
        return _div(2 * self.tensor_bytes / 1e9, self.copy_s)

    @property
    def copy_fraction_fwd(self) -> Optional[float]:
        return _div(self.gbps_fwd, self.copy_gbps)

    @property
    def copy_fraction_fb(self) -> Optional[float]:
        return _div(self.gbps_fb, self.copy_gbps)

    @property
    def baseline_copy_fraction_fb(self) -> Optional[float]:
        """The baseline's forward+backward bandwidth (same floor) as a fraction of the copy bandwidth: a speedup
        of ``k`` over it needs ``k`` times this fraction."""
        return _div(self._floor_gbps_fb(self.baseline.fb_s), self.copy_gbps)

    @property
    def floor_at_copy_s(self) -> Optional[float]:
        """The forward+backward traffic floor (5 x tensor bytes) moved at the copy bandwidth: the least time any
        kernels could take (a copy moves 2 x tensor bytes)."""
        return None if self.copy_s is None else 2.5 * self.copy_s

    @property
    def empty_fraction(self) -> Optional[float]:
        """The step of an op that does no work, as a fraction of normzoo's forward+backward time."""
        return _div(self.empty_fb_s, self.normzoo.fb_s)

    def copy_needed_within(self, seconds: Optional[float]) -> Optional[float]:
        """The fraction of the copy bandwidth at which kernels would have to move the traffic floor for a step to
        take ``seconds`` with the empty step's fixed cost on top (``inf`` where that cost alone is as long)."""
        if seconds is None or self.floor_at_copy_s is None or self.empty_fb_s is None:
            return None
        left = seconds - self.empty_fb_s
        return self.floor_at_copy_s / left if left > 0 else math.inf

    @property
    def vs_bn(self) -> Optional[float]:
        return _div(self.normzoo.fb_s, self.reference_fb_s)

    @property
    def bf16_vs_fp32(self) -> Optional[float]:
        return _div(self.normzoo.fb_s, self.fp32_fb_s) if self.dtype == "bfloat16" else None

    @property
    def saved_vs_input(self) -> Optional[float]:
        return self.saved.activation_bytes / self.tensor_bytes if self.saved is not None else None

    @property
    def label(self) -> str:
        fmt = {"contiguous": "", "channels_last": " CL"}[self.memory_format]
        dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}.get(self.dtype, self.dtype)
        return f"{self.layer} {'x'.join(map(str, self.shape))} {dt}{fmt}"

    def derived(self) -> Dict[str, Optional[float]]:
        names = ("ratio_fwd", "ratio_fb", "gbps_fwd", "gbps_fb", "copy_gbps", "copy_fraction_fwd", "copy_fraction_fb",
                 "baseline_copy_fraction_fb", "empty_fraction", "vs_bn", "bf16_vs_fp32", "saved_vs_input")
        return {n: getattr(self, n) for n in names}

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["saved"] = self.saved.to_dict() if self.saved is not None else None
        out["saved_baseline"] = self.saved_baseline.to_dict() if self.saved_baseline is not None else None
        out.update(elements=self.elements, tensor_bytes=self.tensor_bytes, saved_allowance=self.saved_allowance,
                   derived=self.derived())
        return out


__all__ = ["STAT_BYTES_PER_UNIT", "stats_units", "Timing", "Row"]
