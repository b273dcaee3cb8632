"""Cross-Iteration BatchNorm's window of past iterations on the native kernels (``normzoo/_native/window.c.in``).

The window is ``K`` slots of ``(count, mean, var)`` per channel in the layer's buffers. Each training step
merges the slots into constant moments for the batch's statistics, and stores the step's own moments in one
slot. With tensor operations that is a dozen small calls per step, which at small sizes cost more than the
layer's passes over the data; here each is one call. Both return ``None`` without the native kernels (the
caller then uses tensor operations), or for buffers of a dtype the kernels do not read.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from normzoo import native
from normzoo.native import _D, _I, _I64, _P  # the ctypes argument types of the signature tables
from normzoo.native import _RUNNING_TYPES as _TYPE_CODES

_SIGNATURES = {  # (argument types, result type), or the argument types of a void function
    "nz_window_merge": ([_I64, _I64, _I, _P, _P, _P, _P, _P], _D),
    "nz_window_record": [_I64, _I64, _I, _P, _P, _P, _D, _P, _P, _P],
}


def _code(count: Tensor, mean: Tensor, var: Tensor) -> Optional[int]:
    """The buffers' type code, if the kernels can take them (CPU, contiguous, one known dtype)."""
    code = _TYPE_CODES.get(mean.dtype)
    if (code is None or native.library() is None or count.dtype != mean.dtype or var.dtype != mean.dtype
            or not (count.is_cpu and mean.is_cpu and var.is_cpu)
            or not (count.is_contiguous() and mean.is_contiguous() and var.is_contiguous())):
        return None
    return code


def merge(count: Tensor, mean: Tensor, var: Tensor) -> Optional[Tuple[float, Tensor, Tensor]]:
    """The window's slots (``count`` ``(K,)``, ``mean``/``var`` ``(K, C)``, biased variances) merged per channel:
    ``(total count, mean, M2)``, the last two float64 ``(1, C)`` views of one block; ``None`` where the kernels
    cannot take the buffers."""
    code = _code(count, mean, var)
    if code is None:
        return None
    k, c = mean.shape
    out = torch.empty(2, 1, c, dtype=torch.float64)
    p = out.data_ptr()
    merge_fn = native.entry("nz_window_merge", signatures=_SIGNATURES)
    total = merge_fn(k, c, code, count.data_ptr(), mean.data_ptr(), var.data_ptr(), p, p + 8 * c)
    return float(total), out[0], out[1]


def record(slot: int, count: Tensor, mean: Tensor, var: Tensor, n: float, own_mean: Tensor, own_m2: Tensor,
           keep_old: bool = False) -> Optional[Tensor]:
    """Store an iteration's moments (``n`` elements per channel; ``own_mean``, ``own_m2``, ``C`` values each) in
    slot ``slot``: count ``n``, the mean, the biased variance ``M2 / n``. Returns the
    slot's values before (float64 ``(1 + 2 C,)``: count, mean, var) if ``keep_old``, else an empty tensor;
    ``None`` where the kernels cannot take the buffers (nothing is stored then)."""
    code = _code(count, mean, var)
    if code is None:
        return None
    c = mean.shape[1]
    own_mean, own_m2 = (t if t.dtype == torch.float64 and t.is_contiguous() else t.to(torch.float64).contiguous()
                        for t in (own_mean, own_m2))
    old = torch.empty(1 + 2 * c if keep_old else 0, dtype=torch.float64)
    record_fn = native.entry("nz_window_record", signatures=_SIGNATURES)
    record_fn(slot, c, code, count.data_ptr(), mean.data_ptr(), var.data_ptr(), float(n), own_mean.data_ptr(),
              own_m2.data_ptr(), old.data_ptr() if keep_old else None)
    return old


__all__ = ["merge", "record"]
