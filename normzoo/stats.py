"""The statistics core: moments ``(count, mean, M2)`` that merge exactly.

Every method in normzoo is "statistics, then an affine map". The statistics are the moments of groups
of elements of ``x``:

- ``count`` -- how many elements the group holds (``n``),
- ``mean``  -- their mean ``mu = (1/n) sum x``,
- ``m2``    -- the sum of squared deviations ``M2 = sum (x - mu)^2``, so the biased variance is ``M2 / n``
  and the unbiased one ``M2 / (n - 1)``.

Moments of disjoint groups **merge exactly** (Chan, Golub & LeVeque 1979):

    n   = n_a + n_b
    mu  = mu_a + (mu_b - mu_a) * n_b / n
    M2  = M2_a + M2_b + (mu_b - mu_a)^2 * n_a * n_b / n

One merge serves every policy: BatchNorm statistics are instance (per-(n, c)) moments merged over the
batch; GroupNorm's merge instance moments within a channel group; LayerNorm's merge all channels;
Switchable Norm and Batch-Instance Norm compute instance moments once and merge them into the others;
SyncBatchNorm merges across processes, Cross-Iteration BN across iterations, population statistics
across batches.

Numerics. Statistics are accumulated in float32 (float64 for float64 input) whatever the input dtype.
:func:`moments` reads the data with two fast reductions (``sum x`` and ``sum x^2``) and *guards* the
cancellation in ``sum x^2 - n mu^2``: groups whose mean is large next to their spread are recomputed
from the centred data (two-pass). A channel with mean 1e4 and std 1e-3 in float32 is therefore exact to
float32 precision, and a constant channel has ``M2 == 0`` exactly (so it normalizes to ``beta``, never NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

Count = Union[int, float, Tensor]

#: A group is "ill-conditioned" for the one-pass formula when ``mean^2 > CONDITION * var``: the relative
#: error of ``sum x^2 - n mu^2`` grows like ``eps * (1 + mean^2 / var)``. 8 keeps float32 variances to ~1e-6.
CONDITION = 8.0
#: Low-precision inputs (bfloat16, float16) also centre moderately off-centre groups, so that the
#: per-group coefficients, rounded to the input dtype, stay accurate.
CONDITION_LOW_PRECISION = 0.25


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def condition_threshold(dtype: torch.dtype) -> float:
    """``mean^2 / var`` above which a group is centred before its moments are taken (see module doc)."""
    return CONDITION if dtype in (torch.float32, torch.float64) else CONDITION_LOW_PRECISION


@dataclass(frozen=True)
class Moments:
    """Moments of groups of elements: ``count``, ``mean`` and ``m2`` (sum of squared deviations).

    ``mean`` and ``m2`` are tensors of the same shape (one entry per group). ``count`` is a Python number
    when every group holds the same number of elements, else a tensor broadcastable to ``mean`` (SyncBN
    with unequal batches per process). A group with ``count == 0`` has ``mean == m2 == 0``.
    """

    count: Count
    mean: Tensor
    m2: Tensor

    # -- derived statistics --------------------------------------------------------------------
    def var(self, correction: int = 0) -> Tensor:
        """Variance ``M2 / (count - correction)``: ``correction=0`` biased (used to normalize),
        ``correction=1`` unbiased (the ``m/(m-1)`` factor used for running statistics)."""
        if isinstance(self.count, Tensor):
            denom = (self.count - correction).to(self.m2.dtype)
            return torch.where(denom > 0, self.m2 / denom.clamp_min(1e-30), torch.full_like(self.m2, math.nan))
        denom = self.count - correction
        if denom <= 0:
            raise ValueError(
                f"variance with correction={correction} needs more than {correction} element(s) per group, "
                f"got {self.count}"
            )
        return self.m2 / denom

    def total(self) -> Tensor:
        """``count`` as a tensor broadcast to the shape of ``mean``."""
        if isinstance(self.count, Tensor):
            return self.count.to(self.mean.dtype).expand_as(self.mean)
        return torch.full_like(self.mean, float(self.count))

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, other: "Moments") -> "Moments":
        """Moments of the union of two disjoint groups (elementwise over the group tensors)."""
        return merge(self, other)

    def reduce(self, dim: Union[int, Sequence[int]], keepdim: bool = False) -> "Moments":
        """Merge the groups along ``dim`` of the statistics tensors into one group each.

        ``Moments`` of shape ``(N, C)`` (one group per sample and channel) reduced over ``dim=0`` give the
        BatchNorm statistics of shape ``(C,)``. Exact for any counts (the generalized Chan formula
        ``M2 = sum M2_i + sum n_i (mu_i - mu)^2``).
        """
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if isinstance(self.count, Tensor):
            n_i = self.total()
            n = n_i.sum(dims, keepdim=True)
            safe = n.clamp_min(1)
            mean = (n_i * self.mean).sum(dims, keepdim=True) / safe
            dev = (self.mean - mean).square_().mul_(n_i)
            m2 = self.m2.sum(dims, keepdim=True) + dev.sum(dims, keepdim=True)
            if not keepdim:
                n, mean, m2 = (t.squeeze(dims) if dims else t for t in (n, mean, m2))
            return Moments(n, mean, m2)
        size = math.prod(self.mean.shape[d] for d in dims)
        mean = self.mean.mean(dims, keepdim=True)
        dev = (self.mean - mean).square_().sum(dims, keepdim=keepdim)
        m2 = self.m2.sum(dims, keepdim=keepdim) + dev * self.count
        if not keepdim:
            mean = mean.squeeze(dims) if dims else mean
        return Moments(self.count * size, mean, m2)

    # -- plumbing ----------------------------------------------------------------------------------
    def detach(self) -> "Moments":
        count = self.count.detach() if isinstance(self.count, Tensor) else self.count
        return Moments(count, self.mean.detach(), self.m2.detach())

    def reshape(self, *shape: int) -> "Moments":
        count = self.count.reshape(*shape) if isinstance(self.count, Tensor) and self.count.dim() else self.count
        return Moments(count, self.mean.reshape(*shape), self.m2.reshape(*shape))

    def pack(self) -> Tensor:
        """``(count, count * mean, m2)`` stacked on a new leading dim: a tensor to send across processes.

        Use :func:`unpack` on the (gathered) result. ``count * mean`` is sent instead of ``mean`` so that
        summing packs of disjoint groups gives the first two raw moments directly.
        """
        n = self.total()
        return torch.stack([n, n * self.mean, self.m2])

    @staticmethod
    def unpack(packed: Tensor) -> "Moments":
        """Inverse of :meth:`pack` (a tensor of shape ``(3, *group_shape)``)."""
        n, s1, m2 = packed.unbind(0)
        return Moments(n, s1 / n.clamp_min(1), m2)


def merge(a: Moments, b: Moments) -> Moments:
    """Chan's parallel formula: the moments of ``a`` and ``b`` taken together (elementwise)."""
    na, nb = a.count, b.count
    if not isinstance(na, Tensor) and not isinstance(nb, Tensor):
        n = na + nb
        if n == 0:
            return Moments(0, torch.zeros_like(a.mean), torch.zeros_like(a.m2))
        delta = b.mean - a.mean
        mean = a.mean + delta * (nb / n)
        m2 = a.m2 + b.m2 + delta.square() * (na * nb / n)
        return Moments(n, mean, m2)
    na_t, nb_t = a.total(), b.total()
    n = na_t + nb_t
    safe = n.clamp_min(1)
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb_t / safe)
    m2 = a.m2 + b.m2 + delta.square() * (na_t * nb_t / safe)
    return Moments(n, mean, m2)


def _normalize_dims(x: Tensor, dim: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -x.dim() <= d < x.dim():
            raise ValueError(f"moments: dim {d} is out of range for a tensor of {x.dim()} dims")
        out.append(d % x.dim())
    if len(set(out)) != len(out):
        raise ValueError(f"moments: repeated dims in {dims}")
    return tuple(sorted(out))


def raw_moments(x: Tensor, dims: Tuple[int, ...], keepdim: bool = True) -> Moments:
    """One-pass moments from ``sum x`` and ``sum x^2`` (fast, unguarded: see :func:`moments`)."""
    acc = accumulation_dtype(x.dtype)
    n = math.prod(x.shape[d] for d in dims) if dims else 1
    if n == 0:
        raise ValueError(f"moments: the reduced dims {dims} of a tensor of shape {tuple(x.shape)} are empty")
    if not dims:
        mean = x.to(acc)
        return Moments(1, mean, torch.zeros_like(mean))
    s1 = x.sum(dims, keepdim=keepdim, dtype=acc)
    s2 = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=keepdim, dtype=acc).square()
    mean = s1 / n
    m2 = (s2 - mean * mean * n).clamp_min(0)  # out of place: moments() stays differentiable
    return Moments(n, mean, m2)


def ill_conditioned(m: Moments, dtype: torch.dtype) -> Tensor:
    """Boolean mask of the groups whose one-pass ``M2`` may have lost precision to cancellation."""
    return m.mean.square() * m.count > condition_threshold(dtype) * m.m2


def centered_moments(x: Tensor, dims: Tuple[int, ...], shift: Tensor, keepdim: bool = True) -> Moments:
    """Moments of ``x`` taken around ``shift`` (broadcastable, in the accumulation dtype): two-pass exact."""
    acc = accumulation_dtype(x.dtype)
    d = x.to(acc) - shift
    m = raw_moments(d, dims, keepdim=True)
    m = Moments(m.count, m.mean + shift, m.m2)
    if not keepdim and dims:
        m = Moments(m.count, m.mean.squeeze(dims), m.m2.squeeze(dims))
    return m


def moments(x: Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False) -> Moments:
    """Moments of ``x`` over ``dim``: one group per index of the remaining dims.

    Shapes: ``x`` of any shape; ``mean`` and ``m2`` have ``x``'s shape without ``dim`` (kept as size 1
    with ``keepdim=True``); ``count`` is the number of reduced elements. Accumulated in float32 (float64
    for float64 input). Fast path: two reductions; guarded groups (see :data:`CONDITION`) are recomputed
    around their mean, so the result is as accurate as the two-pass formula.
    """
    if not x.is_floating_point():
        raise TypeError(f"moments: expected a floating-point tensor, got dtype {x.dtype}")
    dims = _normalize_dims(x, dim)
    m = raw_moments(x, dims, keepdim=True)
    if dims and bool(ill_conditioned(m, x.dtype).any()):
        m = centered_moments(x, dims, m.mean, keepdim=True)
    if not keepdim and dims:
        m = Moments(m.count, m.mean.squeeze(dims), m.m2.squeeze(dims))
    return m


__all__ = [
    "Moments",
    "merge",
    "moments",
    "raw_moments",
    "centered_moments",
    "ill_conditioned",
    "accumulation_dtype",
    "condition_threshold",
    "CONDITION",
    "CONDITION_LOW_PRECISION",
]
