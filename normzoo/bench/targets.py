"""The performance targets of issue 5, checked row by row (forward+backward; training mode, or eval with ``mode``).

==========  ===========================================================================================
key         target
==========  ===========================================================================================
speedup     baseline time / normzoo time >= 1.0 for every layer and dtype; in float32 >= 2.0 for BatchNorm2d
            contiguous, InstanceNorm (any rank, any format), RMSNorm, GroupNorm and LayerNorm2d in
            channels_last, and for the BatchNorm family against its straightforward paper formula
copy        float32: effective forward+backward bandwidth (5 x tensor bytes / time) >= 50% of copy bandwidth
vs_bn       BatchNorm family (mean-only BN, Batch Renorm, Batch-Instance Norm, Switchable Norm, CBN):
            time <= 1.3 x normzoo BatchNorm's at the same shape, dtype and format
saved       bytes saved for backward (parameters excluded) <= one input-sized tensor + O(N*C) statistics
            (the allowance of :attr:`normzoo.bench.results.Row.saved_allowance`); value and threshold in
            units of one input tensor
bf16        bfloat16 rows: forward+backward time <= the float32 row's (same elements: per element)
==========  ===========================================================================================

The issue states its speed targets "on the CPU, 2 threads, float32, forward+backward, training mode", so the 2x
speedups and the copy fraction are checked on float32 rows (:data:`TARGET_DTYPE`). Other dtypes have their own
target (bfloat16: per element no slower than float32), and every row must still not be slower than its baseline,
which is what a drop-in replacement promises; their copy fraction is reported, not judged.

A speedup target is a time, ``baseline / k``, and a time has a floor: the traffic floor moved at the copy
bandwidth. Each speedup check therefore carries ``needs_copy``, the fraction of the copy bandwidth that meeting it
takes (``k`` times the baseline's own fraction). Where that is above 1, the target asks for more than the machine's
copy rate over the floor's bytes -- reachable only by a cache effect, never by a better kernel -- and the report
says so beside the miss (and counts those misses apart in the summary): a 2x target holds where torch is far from
the floor, as the issue assumes, but not at shapes where torch already reaches half the copy bandwidth.

A time target also has a fixed part: every step of a layer written as an autograd op pays the autograd engine, the
op's calls into Python and the allocation of its outputs before any kernel runs. The benchmark times that cost
alone on the same tensors, as the step of an op that does no work (``empty_fb_s``), and each speedup and copy check
carries ``needs_copy_beside_empty``: the fraction of the copy bandwidth at which kernels would have to move the
traffic floor in the time the target leaves after that fixed cost. Where that is above 1 (or the fixed cost alone
takes the whole time) and the plain ``needs_copy`` is not, the miss is marked as beyond the copy bandwidth beside an
empty step: at small tensors, no kernel, however fast, meets it in a Python autograd op.

Eval rows (``normzoo bench --mode eval``: every module in eval, the running statistics fixed) are held to the same
targets except two the issue states for training mode: the 2x speedups (every layer must still not be slower than
its baseline) and the BatchNorm family's 1.3x of BatchNorm (in eval BatchNorm is one affine pass each way, while
Switchable and Batch-Instance Norm still take per-sample statistics; ``vs_bn`` is reported, not judged).

These are what the report marks; they are measurements on a noisy shared machine, never test assertions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from normzoo.bench.results import Row

SPEEDUP_MIN = 1.0
SPEEDUP_STRONG = 2.0
COPY_FRACTION_MIN = 0.5
VS_BN_MAX = 1.3
BF16_VS_FP32_MAX = 1.0
#: The dtype the issue's 2x speedups and copy fraction are stated for.
TARGET_DTYPE = "float32"

_BN_FAMILY_PREFIXES = ("mbn", "brn", "bin", "switch", "cbn")


@dataclass(frozen=True)
class Check:
    """One target applied to one row: ``value`` against ``threshold`` (``at_least`` or at most)."""

    key: str
    value: Optional[float]
    threshold: float
    at_least: bool
    #: speedup checks: the fraction of the copy bandwidth that meeting the threshold takes (``None``: unknown)
    needs_copy: Optional[float] = None
    #: speedup and copy checks: that fraction in the time left after an empty step's fixed cost (``inf``: none left)
    needs_copy_beside_empty: Optional[float] = None

    @property
    def beyond_copy(self) -> bool:
        """Meeting the threshold takes more than the copy bandwidth over the traffic floor."""
        return self.needs_copy is not None and self.needs_copy > 1.0

    @property
    def beyond_copy_beside_empty(self) -> bool:
        """Not :attr:`beyond_copy`, but meeting the threshold takes more than the copy bandwidth in the time that the
        fixed cost of an autograd op's step leaves."""
        return (not self.beyond_copy and self.needs_copy_beside_empty is not None
                and self.needs_copy_beside_empty > 1.0)

    @property
    def passed(self) -> Optional[bool]:
        """``None`` when the value could not be measured."""
        if self.value is None:
            return None
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def describe(self) -> str:
        text = f"{self.key} {'>=' if self.at_least else '<='} {self.threshold:.4g}"
        if self.passed is False and self.beyond_copy:
            text += f" (needs {self.needs_copy:.0%} of copy)"
        elif self.passed is False and self.beyond_copy_beside_empty:
            need = self.needs_copy_beside_empty
            text += (" (an empty autograd step alone takes longer)" if need == math.inf
                     else f" (needs {need:.0%} of copy beside an empty autograd step)")
        return text

    def to_dict(self) -> Dict[str, object]:
        return {"key": self.key, "value": self.value, "threshold": self.threshold,
                "op": ">=" if self.at_least else "<=", "passed": self.passed, "needs_copy": self.needs_copy,
                "needs_copy_beside_empty": self.needs_copy_beside_empty}


def in_bn_family(layer: str) -> bool:
    return layer.startswith(_BN_FAMILY_PREFIXES)


def speedup_needed(row: Row) -> float:
    """The speedup the issue asks of this row (see the module table; eval rows: :data:`SPEEDUP_MIN`)."""
    name, channels_last = row.layer, row.memory_format == "channels_last"
    strong = row.dtype == TARGET_DTYPE and row.mode == "train" and (
        (name == "bn2d" and not channels_last)
        or name.startswith("in")
        or name == "rms"
        or (channels_last and name in ("gn", "ln2d"))
        or (in_bn_family(name) and row.baseline_kind == "formula")
    )
    return SPEEDUP_STRONG if strong else SPEEDUP_MIN


def checks(row: Row) -> List[Check]:
    """Every target that applies to ``row`` (an errored row has none)."""
    if row.error is not None:
        return []
    need = speedup_needed(row)
    base = row.baseline_copy_fraction_fb
    target_s = None if row.baseline.fb_s is None else row.baseline.fb_s / need
    out = [Check("speedup", row.ratio_fb, need, True, None if base is None else need * base,
                 row.copy_needed_within(target_s))]
    if row.dtype == TARGET_DTYPE:
        floor = row.floor_at_copy_s
        out.append(Check("copy", row.copy_fraction_fb, COPY_FRACTION_MIN, True, None,
                         row.copy_needed_within(None if floor is None else floor / COPY_FRACTION_MIN)))
    if in_bn_family(row.layer) and row.mode == "train":
        out.append(Check("vs_bn", row.vs_bn, VS_BN_MAX, False))
    if row.saved is not None:  # in units of one input tensor, as the table shows it
        out.append(Check("saved", row.saved_vs_input, row.saved_allowance / row.tensor_bytes, False))
    if row.dtype == "bfloat16":
        out.append(Check("bf16", row.bf16_vs_fp32, BF16_VS_FP32_MAX, False))
    return out


def summary(rows: List[Row]) -> Dict[str, Dict[str, int]]:
    """Per target: how many rows passed, missed, or could not be judged, and of the misses how many asked for
    more than the copy bandwidth (``beyond_copy``), and how many more did beside an empty autograd step's fixed
    cost (``beyond_copy_beside_empty``); both are counted inside ``missed`` too."""
    out: Dict[str, Dict[str, int]] = {}
    for row in rows:
        for c in checks(row):
            bucket = out.setdefault(c.key, {"passed": 0, "missed": 0, "unmeasured": 0, "beyond_copy": 0,
                                            "beyond_copy_beside_empty": 0})
            bucket["passed" if c.passed else "missed" if c.passed is False else "unmeasured"] += 1
            bucket["beyond_copy"] += c.passed is False and c.beyond_copy
            bucket["beyond_copy_beside_empty"] += c.passed is False and c.beyond_copy_beside_empty
    return out


__all__ = ["SPEEDUP_MIN", "SPEEDUP_STRONG", "COPY_FRACTION_MIN", "VS_BN_MAX", "BF16_VS_FP32_MAX", "TARGET_DTYPE", "Check",
           "in_bn_family", "speedup_needed", "checks", "summary"]
