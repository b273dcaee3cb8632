"""Filter Response Normalization (+TLU) and EvoNorm B0/S0: formulas, train/eval, gradients, numerics, errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from normzoo.nn.evonorm import EvoNormB0, EvoNormS0, evonorm_b0, evonorm_s0
from normzoo.nn.response import (
    FRN,
    TLU,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
    filter_response_norm,
)
from normzoo.registry import create

torch.set_num_threads(1)


def _randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "learned_eps":
                p.fill_(0.3)
            else:
                p.uniform_(0.5, 1.5) if name in ("weight", "v") else p.uniform_(-0.5, 0.5)
    return m


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


# -- Filter Response Normalization ----------------------------------------------------------------------


def _frn_reference(x, gamma, beta, tau, eps):
    nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.pow(2)
    y = x / torch.sqrt(nu2 + eps)
    if gamma is not None:
        y = y * _view(gamma, x) + _view(beta, x)
    return y if tau is None else torch.max(y, _view(tau, x))


@pytest.mark.parametrize("cls,shape", [(FilterResponseNorm1d, (3, 4, 7)), (FilterResponseNorm2d, (2, 4, 5, 6)),
                                       (FilterResponseNorm3d, (2, 4, 3, 2, 3))])
@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_frn_matches_the_paper_formula(cls, shape, tlu, affine):
    torch.manual_seed(0)
    m = _randomize(cls(4, eps=1e-3, tlu=tlu, affine=affine))
    x = torch.randn(shape) * 3.0 + 0.5
    expected = _frn_reference(x, m.weight, m.bias, m.tau, 1e-3)
    torch.testing.assert_close(m(x), expected)
    m.eval()
    torch.testing.assert_close(m(x), expected)  # no running statistics: eval is the same computation
    assert dict(m.named_buffers()) == {}


def test_frn_learnable_eps_has_a_floor_and_gets_gradient():
    m = FilterResponseNorm2d(3, eps=1e-6, learnable_eps=True, eps_init=1e-4)
    assert m.learned_eps.item() == pytest.approx(1e-4)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        m.learned_eps.fill_(-0.2)  # |eps_l| is used: same as +0.2
    torch.testing.assert_close(m(x), _frn_reference(x, m.weight, m.bias, m.tau, 1e-6 + 0.2))
    m(x).sum().backward()
    assert m.learned_eps.grad is not None and m.learned_eps.grad.item() != 0.0
    with torch.no_grad():
        m.learned_eps.zero_()
    zero = torch.zeros(2, 3, 4, 4, requires_grad=True)
    out = m(zero)  # eps = eps0 > 0: never 0 / 0
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (5, 4)])  # the fused kernel, and the operations' path
@pytest.mark.parametrize("eps", [1e-3, 1, torch.tensor(1e-3, dtype=torch.float64)])
def test_frn_float_int_and_tensor_eps_agree_with_the_formula_and_gradcheck(shape, eps):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    gamma, beta, tau = (torch.empty(4, dtype=torch.float64).uniform_(-1, 1, generator=g).requires_grad_()
                        for _ in range(3))
    want = _frn_reference(x, gamma, beta, tau, float(eps))
    torch.testing.assert_close(filter_response_norm(x, gamma, beta, tau, eps), want)
    assert torch.autograd.gradcheck(lambda *a: filter_response_norm(*a, eps=eps), (x, gamma, beta, tau))


@pytest.mark.parametrize("make,shape", [(lambda: FilterResponseNorm2d(3), (4, 3, 1, 1)),
                                        (lambda: FilterResponseNorm1d(3), (4, 3))])
def test_frn_warns_on_single_spatial_position(make, shape):
    with pytest.warns(UserWarning, match="single spatial position"):
        make()(torch.randn(shape))


@pytest.mark.parametrize("make", [lambda: FilterResponseNorm2d(3, learnable_eps=True),
                                  lambda: FilterResponseNorm2d(3, eps=1e-2)])
def test_frn_no_warning_with_learned_or_large_eps_on_1x1(make):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = make()(torch.randn(4, 3, 1, 1))
    assert torch.isfinite(y).all()


def test_frn_constant_and_zero_input_give_no_nan():
    m = _randomize(FilterResponseNorm2d(3))
    for value in (0.0, 5.0, -1e4):
        x = torch.full((2, 3, 4, 4), value, requires_grad=True)
        y = m(x)
        assert torch.isfinite(y).all()
        y.sum().backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("learnable_eps", [True, False])
def test_frn_gradcheck_float64(affine, learnable_eps):
    torch.manual_seed(1)
    m = _randomize(FilterResponseNorm2d(3, eps=1e-3, affine=affine, learnable_eps=learnable_eps).double())
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(m.parameters())

    def f(x, *ps):
        named = dict(zip([n for n, _ in m.named_parameters()], ps))
        eps = 1e-3 + named["learned_eps"].abs() if learnable_eps else 1e-3
        return filter_response_norm(x, named.get("weight"), named.get("bias"), named["tau"], eps)

    assert torch.autograd.gradcheck(f, (x,) + params)


def test_frn_low_precision_matches_float32():
    torch.manual_seed(2)
    m = _randomize(FilterResponseNorm2d(4))
    x = torch.randn(2, 4, 8, 8) * 100.0
    y16 = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), m.float()(x), atol=3e-2, rtol=2e-2)


def test_frn_module_api():
    m = FRN(8)
    assert isinstance(m, FilterResponseNorm2d) and m.tlu
    assert set(m.state_dict()) == {"weight", "bias", "tau"}
    assert set(FilterResponseNorm2d(8, affine=False, tlu=False, learnable_eps=True).state_dict()) == {"learned_eps"}
    assert "tlu=True" in repr(m) and "8" in repr(m)
    _randomize(m)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(8)) and torch.equal(m.tau, torch.zeros(8))
    made = create("frn", 8)
    assert isinstance(made, FilterResponseNorm2d) and made.tau is not None
    assert isinstance(create("frn", 8, tlu=False), FilterResponseNorm2d)
    assert isinstance(create("frn1d", 8), FilterResponseNorm1d)
    t = TLU(3)
    with torch.no_grad():
        t.tau.fill_(0.5)
    torch.testing.assert_close(t(torch.tensor([[[0.0], [1.0], [0.2]]])), torch.tensor([[[0.5], [1.0], [0.5]]]))


def test_frn_errors():
    m = FilterResponseNorm2d(3)
    with pytest.raises(ValueError, match="4D"):
        m(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 5, 4, 4))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps"):
        FilterResponseNorm2d(3, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        filter_response_norm(torch.randn(2, 3, 4, 4), eps=-1.0)
    with pytest.raises(ValueError, match="num_features"):
        FilterResponseNorm2d(0)
    with pytest.raises(ValueError, match="tau"):
        filter_response_norm(torch.randn(2, 3, 4, 4), tau=torch.zeros(4))
    with pytest.raises(ValueError, match="eps_init"):
        FilterResponseNorm2d(3, learnable_eps=True, eps_init=-1.0)


# -- EvoNorm ----------------------------------------------------------------------------------------------


def _b0_reference(x, var_b, gamma, beta, v, eps):
    var_i = x.var(dim=tuple(range(2, x.dim())), unbiased=False, keepdim=True)
    den = torch.maximum(torch.sqrt(_view(var_b, x) + eps), _view(v, x) * x + torch.sqrt(var_i + eps))
    return x / den * _view(gamma, x) + _view(beta, x)


def _s0_reference(x, groups, gamma, beta, v, eps):
    n, c = x.shape[:2]
    var_g = x.reshape(n, groups, -1).var(dim=2, unbiased=False)
    std = torch.sqrt(var_g + eps).repeat_interleave(c // groups, dim=1).view(n, c, *([1] * (x.dim() - 2)))
    return x * torch.sigmoid(_view(v, x) * x) / std * _view(gamma, x) + _view(beta, x)


@pytest.mark.parametrize("shape", [(4, 6, 5, 5), (3, 6, 7), (2, 6, 3, 2, 2)])
def test_b0_train_eval_and_running_variance(shape):
    torch.manual_seed(3)
    m = _randomize(EvoNormB0(6, momentum=0.1))
    x = torch.randn(shape) * 2.0 + 1.0
    dims = (0,) + tuple(range(2, x.dim()))
    var_b = x.var(dim=dims, unbiased=False)
    torch.testing.assert_close(m(x), _b0_reference(x, var_b, m.weight, m.bias, m.v, m.eps))
    torch.testing.assert_close(m.running_var, 0.9 * torch.ones(6) + 0.1 * x.var(dim=dims, unbiased=True))
    assert m.num_batches_tracked.item() == 1
    m.eval()
    running = m.running_var.clone()
    torch.testing.assert_close(m(x), _b0_reference(x, running, m.weight, m.bias, m.v, m.eps))
    assert torch.equal(m.running_var, running) and m.num_batches_tracked.item() == 1


def test_b0_cumulative_average_and_no_tracking():
    torch.manual_seed(4)
    m = EvoNormB0(3, momentum=None)
    xs = [torch.randn(4, 3, 3, 3) * s for s in (1.0, 3.0)]
    for x in xs:
        m(x)
    expected = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(m.running_var, expected)
    free = EvoNormB0(3, track_running_stats=False).eval()
    assert free.running_var is None and set(free.state_dict()) == {"weight", "bias", "v"}
    x = xs[1]
    torch.testing.assert_close(free(x), _b0_reference(x, x.var(dim=(0, 2, 3), unbiased=False), free.weight,
                                                      free.bias, free.v, free.eps))


@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize("shape", [(2, 6, 4, 5), (3, 6, 8)])
def test_s0_matches_the_paper_formula(groups, shape):
    torch.manual_seed(5)
    m = _randomize(EvoNormS0(6, groups=groups))
    x = torch.randn(shape) * 2.0 - 0.5
    expected = _s0_reference(x, groups, m.weight, m.bias, m.v, m.eps)
    torch.testing.assert_close(m(x), expected)
    m.eval()
    torch.testing.assert_close(m(x), expected)
    assert set(m.state_dict()) == {"weight", "bias", "v"}


def test_s0_default_groups():
    assert EvoNormS0(64).groups == 32
    assert EvoNormS0(48).groups == 24
    assert EvoNormS0(10).groups == 10
    assert create("evonorm_s0", 64, groups=8).groups == 8


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_b0_gradcheck_float64(affine, training):
    torch.manual_seed(6)
    m = _randomize(EvoNormB0(4, affine=affine).double())
    with torch.no_grad():
        m.running_var.uniform_(0.5, 2.0)
        m.v.uniform_(-1.0, 1.0)  # both branches of the max are taken
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        p = dict(zip(names, ps))
        return evonorm_b0(x, m.running_var.clone(), p.get("weight"), p.get("bias"), p["v"], training, 0.1, m.eps)

    assert torch.autograd.gradcheck(f, (x,) + tuple(m.parameters()))


@pytest.mark.parametrize("affine", [True, False])
def test_s0_gradcheck_float64(affine):
    torch.manual_seed(7)
    m = _randomize(EvoNormS0(4, groups=2, affine=affine).double())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        p = dict(zip(names, ps))
        return evonorm_s0(x, 2, p.get("weight"), p.get("bias"), p["v"], m.eps)

    assert torch.autograd.gradcheck(f, (x,) + tuple(m.parameters()))


def test_evonorm_gradcheck_far_from_zero():
    # the recentred path of merged_moments (groups with mean >> std) must give the same gradients
    torch.manual_seed(9)
    x = (torch.randn(3, 4, 3, 3, dtype=torch.float64) * 0.5 + 20.0).requires_grad_()
    v = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: evonorm_s0(x, 2, v=v), (x, v))
    assert torch.autograd.gradcheck(lambda x, v: evonorm_b0(x, None, v=-v.abs(), training=True), (x, v))


@pytest.mark.parametrize("make", [lambda: EvoNormB0(4), lambda: EvoNormS0(4, groups=2)])
@pytest.mark.parametrize("value", [0.0, 3.0])
def test_evonorm_constant_input_gives_no_nan(make, value):
    m = make()
    for mode in (True, False):
        m.train(mode)
        x = torch.full((2, 4, 3, 3), value, requires_grad=True)
        y = m(x)
        assert torch.isfinite(y).all()
        y.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_evonorm_far_from_zero_channels_keep_their_variance():
    torch.manual_seed(8)
    x64 = torch.randn(4, 4, 6, 6, dtype=torch.float64) * 1e-2 + 1e4
    x = x64.float()
    s0 = EvoNormS0(4, groups=2, affine=False)
    with torch.no_grad():
        s0.v.zero_()  # sigmoid(0) = 1/2: the output is x / (2 std), which exposes any error in std
    torch.testing.assert_close(s0(x).double(), _s0_reference(x.double(), 2, torch.ones(4, dtype=torch.float64),
                                                             torch.zeros(4, dtype=torch.float64),
                                                             torch.zeros(4, dtype=torch.float64), 1e-5),
                               rtol=1e-3, atol=0)
    b0 = EvoNormB0(4, affine=False)
    with torch.no_grad():
        b0.v.fill_(-1.0)  # v x < 0: the batch branch is taken
    var_b = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(b0(x).double(), x.double() / torch.sqrt(_view(var_b, x) + 1e-5), rtol=1e-3, atol=0)


def test_evonorm_module_api():
    b0 = EvoNormB0(8)
    assert set(b0.state_dict()) == {"weight", "bias", "v", "running_var", "num_batches_tracked"}
    assert "momentum=0.1" in repr(b0)
    _randomize(b0)
    b0(torch.randn(2, 8, 3, 3))
    b0.reset_parameters()
    assert torch.equal(b0.v, torch.ones(8)) and torch.equal(b0.running_var, torch.ones(8))
    assert b0.num_batches_tracked.item() == 0
    assert isinstance(create("evonorm_b0", 8), EvoNormB0)
    assert "groups=8" in repr(create("evonorm_s0", 16, groups=8))
    s0 = EvoNormS0(8, affine=False)
    assert s0.weight is None and set(s0.state_dict()) == {"v"}


def test_evonorm_errors():
    with pytest.raises(ValueError, match="channels"):
        EvoNormB0(4)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="input"):
        EvoNormS0(4)(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        EvoNormS0(4)(torch.ones(2, 4, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps"):
        EvoNormB0(4, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        evonorm_s0(torch.randn(2, 4, 3), 2, eps=-1e-5)
    with pytest.raises(ValueError, match="divide"):
        EvoNormS0(6, groups=4)
    with pytest.raises(ValueError, match="more than 1"):
        EvoNormB0(4)(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="momentum"):
        EvoNormB0(4, momentum=1.5)
    with pytest.raises(ValueError, match="running_var"):
        evonorm_b0(torch.randn(2, 4, 3), torch.ones(3))


@pytest.mark.parametrize("make", [lambda: FilterResponseNorm2d(4), lambda: EvoNormB0(4), lambda: EvoNormS0(4, groups=2)])
def test_channels_last_is_kept(make):
    torch.manual_seed(10)
    m = _randomize(make())
    x = torch.randn(2, 4, 5, 6)
    y = m(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, m(x))

