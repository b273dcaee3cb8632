"""The statistics core: moments are exact, merge exactly, and survive ill-conditioned data."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normzoo import stats
from normzoo.stats import Moments, merge, moments


def _np_moments(a, axis):
    a = np.asarray(a, dtype=np.float64)
    mean = a.mean(axis=axis)
    m2 = ((a - a.mean(axis=axis, keepdims=True)) ** 2).sum(axis=axis)
    return mean, m2


@pytest.mark.parametrize("dim", [0, (0, 2), (1, 2, 3), -1])
def test_moments_match_numpy(dim):
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64) * 3 + 2
    m = moments(x, dim)
    axis = dim if isinstance(dim, int) else tuple(dim)
    mean, m2 = _np_moments(x.numpy(), axis)
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.m2.numpy(), m2, rtol=1e-10)
    assert m.count == x.numel() // m.mean.numel()


def test_var_corrections():
    x = torch.randn(10, 3, dtype=torch.float64)
    m = moments(x, 0)
    torch.testing.assert_close(m.var(0), x.var(0, correction=0))
    torch.testing.assert_close(m.var(1), x.var(0, correction=1))
    with pytest.raises(ValueError, match="more than 1"):
        moments(x[:1], 0).var(1)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    loc=st.floats(-100, 100),
    scale=st.floats(0.01, 10),
)
def test_chan_merge_is_exact(sizes, loc, scale):
    gen = torch.Generator().manual_seed(len(sizes))
    parts = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * scale + loc for n in sizes]
    merged = moments(parts[0], 0)
    for p in parts[1:]:
        merged = merge(merged, moments(p, 0))
    whole = moments(torch.cat(parts), 0)
    assert merged.count == whole.count
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-9, atol=1e-9)


def test_reduce_equals_moments_over_more_dims():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) + 3
    per_instance = moments(x, (2, 3))  # (6, 4)
    bn = per_instance.reduce(0)
    ref = moments(x, (0, 2, 3))
    torch.testing.assert_close(bn.mean, ref.mean)
    torch.testing.assert_close(bn.m2, ref.m2)
    assert bn.count == ref.count


def test_reduce_with_unequal_tensor_counts_and_empty_groups():
    a = torch.randn(7, 2, dtype=torch.float64)
    b = torch.randn(3, 2, dtype=torch.float64) + 5
    ma, mb = moments(a, 0), moments(b, 0)
    empty = Moments(0, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    stacked = Moments(
        torch.tensor([7.0, 3.0, 0.0], dtype=torch.float64).unsqueeze(1),
        torch.stack([ma.mean, mb.mean, empty.mean]),
        torch.stack([ma.m2, mb.m2, empty.m2]),
    )
    r = stacked.reduce(0)
    ref = moments(torch.cat([a, b]), 0)
    torch.testing.assert_close(r.mean, ref.mean)
    torch.testing.assert_close(r.m2, ref.m2)
    torch.testing.assert_close(r.count, torch.full((2,), 10.0, dtype=torch.float64))


def test_pack_unpack_roundtrip_and_sum_of_packs():
    x = torch.randn(5, 3, dtype=torch.float64)
    m = moments(x, 0)
    u = Moments.unpack(m.pack())
    torch.testing.assert_close(u.mean, m.mean)
    torch.testing.assert_close(u.m2, m.m2)


def test_ill_conditioned_float32_channel_is_exact():
    """Mean 1e4 and std 1e-3 in float32: the one-pass formula would lose every digit of the variance."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 3, 50, generator=gen, dtype=torch.float64) * 1e-3 + 1e4
    x = x64.float()
    m = moments(x, (0, 2))
    ref = moments(x.double(), (0, 2))
    torch.testing.assert_close(m.var().double(), ref.var(), rtol=1e-4, atol=0)
    naive = (x * x).mean((0, 2)) - x.mean((0, 2)) ** 2  # what an unguarded E[x^2]-E[x]^2 gives
    assert ((naive.double() - ref.var()).abs() / ref.var()).max() > 0.5


def test_constant_channel_has_zero_variance():
    x = torch.full((4, 3, 5), 7.25)
    m = moments(x, (0, 2))
    assert torch.all(m.m2 == 0)


def test_accumulation_dtype():
    x = torch.randn(4, 3).bfloat16()
    m = moments(x, 0)
    assert m.mean.dtype == torch.float32
    assert moments(x.double(), 0).mean.dtype == torch.float64
    assert stats.accumulation_dtype(torch.float16) == torch.float32


def test_moments_errors():
    with pytest.raises(TypeError, match="floating-point"):
        moments(torch.arange(6), 0)
    with pytest.raises(ValueError, match="out of range"):
        moments(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="empty"):
        moments(torch.randn(0, 4), 0)


def test_moments_are_differentiable():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moments(x, 0).var(), (x,))
    x_far = (torch.randn(5, 4, dtype=torch.float64) + 1e3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: moments(x, 0).var(), (x_far,))
