"""Switchable Normalization (Luo et al. 2018): one-hot mixtures are IN, LN, BN; the NumPy reference; 1x1 input."""
import numpy as np
import pytest
import torch

import normzoo
import normzoo.reference as R
from normzoo import nn as znn
from normzoo.nn.switchable import SWITCH_ORDER, switchable_norm

TOL = dict(rtol=1e-4, atol=2e-5)
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _one_hot(module, k):
    with torch.no_grad():
        module.mean_logits.zero_()[k] = 1e4
        module.var_logits.zero_()[k] = 1e4


def _affine(module, gen):
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return module


@pytest.mark.parametrize("k,ref_cls", [(0, lambda c: znn.InstanceNorm2d(c, affine=True)),
                                       (1, znn.LayerNorm2d), (2, znn.BatchNorm2d)])
def test_one_hot_mixture_is_in_ln_bn(k, ref_cls):
    assert SWITCH_ORDER == ("in", "ln", "bn")
    gen = torch.Generator().manual_seed(k)
    sn, ref = znn.SwitchNorm2d(3), _affine(ref_cls(3), gen)
    sn.load_state_dict(ref.state_dict(), strict=False)
    _one_hot(sn, k)
    assert torch.equal(sn.mean_weight.detach(), torch.eye(3)[k]) and torch.equal(sn.var_weight.detach(), torch.eye(3)[k])
    for train in (True, True, False):
        sn.train(train), ref.train(train)
        x = torch.randn(4, 3, 5, 3, generator=gen) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = sn(x1), ref(x2)
        g = torch.randn(x.shape, generator=gen)
        y1.backward(g), y2.backward(g)
        torch.testing.assert_close(y1, y2, **TOL)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        torch.testing.assert_close(sn.weight.grad, ref.weight.grad, **TOL)
        torch.testing.assert_close(sn.bias.grad, ref.bias.grad, **TOL)
        sn.zero_grad(), ref.zero_grad()
    if k == 2:  # the BN part keeps BatchNorm's running statistics
        torch.testing.assert_close(sn.running_mean, ref.running_mean, **TOL)
        torch.testing.assert_close(sn.running_var, ref.running_var, **TOL)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_matches_numpy_reference(mode):
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 2.0, (3, 4, 3, 5))
    gamma, beta = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    mw, vw = rng.normal(size=3), rng.normal(size=3)
    mu, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    dout = rng.normal(size=x.shape)
    param = {"mode": mode, "momentum": 0.9, "running_mean": mu.copy(), "running_var": var.copy(), "unbiased": True}
    out, cache = R.switchnorm_forward(x, gamma, beta, mw, vw, param)
    grads = R.switchnorm_backward(dout, cache)
    m = znn.SwitchNorm2d(4, momentum=0.1).double().train(mode == "train")
    with torch.no_grad():
        for p, v in ((m.weight, gamma), (m.bias, beta), (m.mean_logits, mw), (m.var_logits, vw),
                     (m.running_mean, mu), (m.running_var, var)):
            p.copy_(torch.from_numpy(v))
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt)
    y.backward(torch.from_numpy(dout))
    ours = (y, xt.grad, m.weight.grad, m.bias.grad, m.mean_logits.grad, m.var_logits.grad)
    for a, b in zip(ours, (out,) + tuple(grads)):
        np.testing.assert_allclose(a.detach().numpy(), b, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(m.running_mean.numpy(), param["running_mean"], rtol=1e-12)
    np.testing.assert_allclose(m.running_var.numpy(), param["running_var"], rtol=1e-12)


@pytest.mark.parametrize("shape", [(3, 2, 3, 2), (4, 2, 1, 1), (5, 2), (3, 2, 4)])
def test_gradcheck_float64(shape):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    ml = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    vl = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    fn = lambda x, w, b, ml, vl: switchable_norm(x, ml, vl, None, None, w, b, training=True)
    assert torch.autograd.gradcheck(fn, (x, w, b, ml, vl))
    fn_eval = lambda x, w, b, ml, vl: switchable_norm(x, ml, vl, rm, rv, w, b, training=False)
    assert torch.autograd.gradcheck(fn_eval, (x, w, b, ml, vl))


def test_one_by_one_input_has_no_nan():
    """N x C x 1 x 1: the instance variance is 0 (the official code's unbiased variance is 0/0 there)."""
    m = znn.SwitchNorm2d(4)
    x = torch.randn(6, 4, 1, 1, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    for t in (y, x.grad, m.mean_logits.grad, m.var_logits.grad, m.weight.grad):
        assert torch.isfinite(t).all()
    _one_hot(m, 0)  # pure IN on a single position: x - mu_IN = 0, so y = beta
    torch.testing.assert_close(m(x), m.bias.detach().view(1, -1, 1, 1).expand(6, 4, 1, 1))


def test_large_mean_channel_float32():
    """mean 1e4, std 1e-2: merged LN/BN variances stay accurate (no E[x^2] - E[x]^2)."""
    x = (torch.randn(4, 3, 6, 6, dtype=torch.float64) * 1e-2 + 1e4).float()
    m32 = znn.SwitchNorm2d(3)
    with torch.no_grad():
        m32.mean_logits.copy_(torch.tensor([0.2, -0.4, 0.5])), m32.var_logits.copy_(torch.tensor([-0.3, 0.6, 0.1]))
    y64 = m32.double()(x.double())
    y32 = m32.float()(x)
    assert torch.isfinite(y32).all() and float(y64.detach().std()) > 0.5
    torch.testing.assert_close(y32, y64.float(), rtol=1e-3, atol=1e-3)


def test_conventions_and_errors():
    m = normzoo.create("switch2d", 5)
    assert isinstance(m, znn.SwitchNorm2d)
    assert isinstance(normzoo.create("switch1d", 5), znn.SwitchNorm1d)
    torch.testing.assert_close(m.mean_weight.detach(), torch.full((3,), 1 / 3))
    missing, unexpected = m.load_state_dict(torch.nn.BatchNorm2d(5).state_dict(), strict=False)
    assert sorted(missing) == ["mean_logits", "var_logits"] and unexpected == []
    with torch.no_grad():
        m.mean_logits.normal_()
    m.reset_parameters()
    torch.testing.assert_close(m.var_weight.detach(), torch.full((3,), 1 / 3))
    torch.testing.assert_close(m.mean_weight.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="SwitchNorm2d: expected 4D input"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 5, 1, 1))
    with pytest.raises(ValueError, match=r"mean_logits must be a tensor of shape \(3,\)"):
        switchable_norm(torch.randn(2, 3, 2), torch.zeros(2), torch.zeros(3))
    nt = znn.SwitchNorm1d(3, track_running_stats=False).eval()  # no running stats: batch statistics in eval
    x = torch.randn(6, 3)
    torch.testing.assert_close(nt(x), nt.train()(x))


def test_constant_channel_stays_finite():
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 7.0
    m = znn.SwitchNorm2d(3)
    x.requires_grad_()
    y = m(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_saved_for_backward_is_the_input_plus_small_statistics():
    from test_core_memory import saved_bytes

    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    m = znn.SwitchNorm2d(16)
    assert saved_bytes(m, x) <= x.numel() * x.element_size() + 6 * 8 * 16 * 8  # x, then O(N C) float64
