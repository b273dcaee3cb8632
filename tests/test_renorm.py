"""Batch Renormalization (Ioffe 2017): BatchNorm limit, the paper's formula, the NumPy reference, the schedule."""
import copy
import math

import numpy as np
import pytest
import torch

import normzoo
import normzoo.reference as R
from normzoo import nn as znn
from normzoo.nn.renorm import RenormSchedule, batch_renorm

TOL = dict(rtol=1e-4, atol=2e-5)
TIGHT = dict(rtol=1e-10, atol=1e-12)

CASES = [(znn.BatchRenorm1d, torch.nn.BatchNorm1d, (9, 5)), (znn.BatchRenorm1d, torch.nn.BatchNorm1d, (4, 5, 6)),
         (znn.BatchRenorm2d, torch.nn.BatchNorm2d, (4, 5, 3, 4)),
         (znn.BatchRenorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 2, 3))]


def _randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", CASES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_r_max_1_d_max_0_is_batchnorm(ours_cls, torch_cls, shape, momentum):
    gen = torch.Generator().manual_seed(0)
    theirs = torch_cls(5, momentum=momentum)
    bn = {1: znn.BatchNorm1d, 2: znn.BatchNorm2d, 3: znn.BatchNorm3d}[len(shape) - 2 if len(shape) > 2 else 1](
        5, momentum=momentum)
    ours = ours_cls(5, momentum=momentum, r_max=1.0, d_max=0.0)
    _randomize(theirs, gen)
    ours.load_state_dict(theirs.state_dict())  # a BatchNorm checkpoint loads strictly: same keys
    bn.load_state_dict(theirs.state_dict())
    for step in range(4):
        if step == 3:
            ours.eval(), theirs.eval(), bn.eval()
        x = torch.randn(shape, generator=gen) * 3 + 2
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = [m(xi) for m, xi in zip((ours, theirs, bn), xs)]
        g = torch.randn(shape, generator=gen)
        for y in ys:
            y.backward(g)
        for y, xi in zip(ys[1:], xs[1:]):
            torch.testing.assert_close(ys[0], y, **TOL)
            torch.testing.assert_close(xs[0].grad, xi.grad, **TOL)
        for p1, p2 in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, **TOL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
    assert int(ours.num_batches_tracked) == 3
    theirs.load_state_dict(ours.state_dict())


def _paper_brn(x, gamma, beta, mu, var, eps, r_max, d_max):
    """The paper's Algorithm 1 in plain torch ops (autograd supplies the gradient; r, d stop-gradient)."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(var + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - mu) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape)
    return gamma.view(shape) * (x_hat * r.view(shape) + d.view(shape)) + beta.view(shape), r, d


@pytest.mark.parametrize("shape, channels_last", [((6, 4), False), ((3, 4, 5, 2), False), ((3, 4, 5, 2), True),
                                                  ((16, 4, 32, 33), False), ((16, 4, 32, 33), True)])
def test_training_step_matches_paper_algorithm_with_clipping_active(shape, channels_last):
    # (16, 4, 32, 33): large enough for the kernels' threads
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    gamma = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    mu = torch.tensor([0.0, 3.0, -4.0, 1.0], dtype=torch.float64)  # far from the batch: d clips at +-d_max
    var = torch.tensor([1.0, 0.01, 100.0, 4.0], dtype=torch.float64)  # r clips at both ends
    rm, rv = mu.clone(), var.clone()
    y = batch_renorm(x, rm, rv, gamma, beta, training=True, momentum=0.3, eps=1e-5, r_max=2.0, d_max=0.5)
    x2, g2, b2 = (t.detach().clone().requires_grad_() for t in (x, gamma, beta))
    y2, r, d = _paper_brn(x2, g2, b2, mu, var, 1e-5, 2.0, 0.5)
    assert (r == 2.0).any() and (r == 0.5).any() and (d.abs() == 0.5).any()  # the test exercises the clipping
    torch.testing.assert_close(y, y2, **TIGHT)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    gr = torch.autograd.grad(y, (x, gamma, beta), dy)
    gr2 = torch.autograd.grad(y2, (x2, g2, b2), dy)
    for a, b in zip(gr, gr2):
        torch.testing.assert_close(a, b, **TIGHT)
    # running statistics updated after r and d, with the batch statistics (unbiased variance)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(rm, 0.7 * mu + 0.3 * x.detach().mean(dims), **TIGHT)
    torch.testing.assert_close(rv, 0.7 * var + 0.3 * x.detach().var(dims, unbiased=True), **TIGHT)


def test_matches_numpy_reference_train_and_test():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (4, 3, 5, 2))
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    mu, var = np.array([0.5, 3.0, -1.0]), np.array([2.0, 0.2, 9.0])
    dout = rng.normal(size=x.shape)
    for mode in ("train", "test"):
        param = {"mode": mode, "momentum": 0.8, "running_mean": mu.copy(), "running_var": var.copy(),
                 "unbiased": True, "r_max": 1.5, "d_max": 0.7, "eps": 1e-5}
        out, cache = R.batchrenorm_forward(x, gamma, beta, param)
        dx, dgamma, dbeta = R.batchrenorm_backward(dout, cache)
        m = znn.BatchRenorm2d(3, momentum=0.2, r_max=1.5, d_max=0.7).double()
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(gamma)), m.bias.copy_(torch.from_numpy(beta))
            m.running_mean.copy_(torch.from_numpy(mu)), m.running_var.copy_(torch.from_numpy(var))
        m.train(mode == "train")
        xt = torch.from_numpy(x).requires_grad_()
        y = m(xt)
        y.backward(torch.from_numpy(dout))
        np.testing.assert_allclose(y.detach().numpy(), out, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.weight.grad.numpy(), dgamma, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.bias.grad.numpy(), dbeta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.running_mean.numpy(), param["running_mean"], rtol=1e-12)
        np.testing.assert_allclose(m.running_var.numpy(), param["running_var"], rtol=1e-12)
        if mode == "train":
            np.testing.assert_allclose(m.last_r.numpy(), cache.r.reshape(-1), rtol=1e-12)
            np.testing.assert_allclose(m.last_d.numpy(), cache.d.reshape(-1), rtol=1e-12)


def test_without_clipping_training_computes_the_inference_function():
    """The paper's point: with r and d unclipped, the training output is the running-statistics output."""
    gen = torch.Generator().manual_seed(4)
    m = znn.BatchRenorm2d(3, r_max=math.inf, d_max=math.inf).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5])), m.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
        m.weight.uniform_(0.5, 2.0), m.bias.normal_()
    x = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 3
    expected = m.eval()(x)
    torch.testing.assert_close(m.train()(x), expected, **TIGHT)


def test_gradcheck_float64():
    """r and d are constants for the gradient (the paper's stop-gradient); gradcheck's finite differences
    agree with that where they are locally constant: clipped at their limits (or in eval)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([100.0, -5.0], dtype=torch.float64), torch.tensor([100.0, 1e-4], dtype=torch.float64)
    # momentum 0 keeps the running statistics (hence r, d) fixed across gradcheck's evaluations
    fn = lambda x, w, b: batch_renorm(x, rm, rv, w, b, training=True, momentum=0.0, r_max=1.5, d_max=1.0)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(lambda x: batch_renorm(x, rm, rv, training=True, momentum=0.0), (x,))
    assert torch.autograd.gradcheck(lambda x, w, b: batch_renorm(x, rm, rv, w, b, training=False), (x, w, b))
    # r_max = 1, d_max = 0: BatchNorm, whose full derivative gradcheck sees
    fn_bn = lambda x, w, b: batch_renorm(x, rm, rv, w, b, training=True, momentum=0.0, r_max=1.0, d_max=0.0)
    assert torch.autograd.gradcheck(fn_bn, (x, w, b))


def test_large_mean_channel_float32():
    """mean 1e4, std 1e-2 in float32: the statistics are guarded, the result matches float64 arithmetic."""
    x = (torch.randn(8, 2, 6, 6, dtype=torch.float64) * 1e-2 + 1e4).float()
    m32 = znn.BatchRenorm2d(2)
    with torch.no_grad():
        m32.running_mean.fill_(1e4 + 5e-3), m32.running_var.fill_(2e-4)
    outs = []
    for m in (copy.deepcopy(m32).double(), m32):  # the same (float32-representable) running statistics
        outs.append(m(x.to(m.running_mean.dtype)))
        assert 0.5 < float(m.last_r.min()) and float(m.last_r.max()) < 1.0 and float(m.last_d.abs().max()) > 0.1
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0].float(), rtol=1e-3, atol=1e-3)


def test_schedule_follows_the_paper_warmup():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), znn.BatchRenorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 1), znn.BatchRenorm2d(4))
    sched = RenormSchedule(model)
    assert [(m.r_max, m.d_max) for m in sched.layers] == [(1.0, 0.0)] * 2
    assert sched.limits(5000) == (1.0, 0.0)
    r, d = sched.limits(15000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert sched.limits(25000)[1] == 5.0 and sched.limits(40000) == (3.0, 5.0) == sched.limits(10 ** 6)
    short = RenormSchedule(model, r_max=2.0, d_max=1.0, r_steps=(1, 3), d_steps=(0, 2))
    seen = []
    for _ in range(4):
        short.step()
        seen.append((model[1].r_max, model[1].d_max, model[4].r_max))
    assert seen == [(1.0, 0.5, 1.0), (1.5, 1.0, 1.5), (2.0, 1.0, 2.0), (2.0, 1.0, 2.0)]
    again = RenormSchedule(model, r_steps=(1, 3), d_steps=(0, 2))
    again.load_state_dict(short.state_dict())
    assert again.last_step == 4 and (model[1].r_max, model[1].d_max) == (2.0, 1.0)
    with pytest.raises(ValueError, match="no Batch Renorm layer"):
        RenormSchedule(torch.nn.Linear(2, 2))


def test_module_conventions_and_errors():
    m = normzoo.create("brn2d", 6, momentum=0.05, r_max=2.0)
    assert isinstance(m, znn.BatchRenorm2d) and "r_max=2.0" in repr(m) and "d_max=5.0" in repr(m)
    m.set_limits(1.25, 0.0)
    assert (m.r_max, m.d_max) == (1.25, 0.0)
    m(torch.randn(4, 6, 3, 3))
    assert m.last_r.shape == (6,) and float(m.last_r.min()) >= 0.8 - 1e-6 and float(m.last_r.max()) <= 1.25 + 1e-6
    with torch.no_grad():
        m.weight.fill_(3)
    m.reset_parameters()
    assert float(m.weight.detach().sum()) == 6 and float(m.running_var.sum()) == 6 and int(m.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="track_running_stats"):
        znn.BatchRenorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max"):
        znn.BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match="d_max"):
        m.set_limits(2.0, -1.0)
    with pytest.raises(ValueError, match="BatchRenorm2d: expected 6 channels"):
        m(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 6, 1, 1))
    with pytest.raises(ValueError, match="running_mean and running_var"):
        batch_renorm(torch.randn(4, 3), None, None, training=True)
    bn = torch.nn.BatchNorm1d(3, affine=False)
    ours = znn.BatchRenorm1d(3, affine=False, r_max=1.0, d_max=0.0)
    x = torch.randn(7, 3)
    torch.testing.assert_close(ours(x), bn(x), **TOL)


def test_saved_for_backward_is_the_input_plus_small_statistics():
    from test_core_memory import saved_bytes

    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    m = znn.BatchRenorm2d(16)
    assert saved_bytes(m, x) <= x.numel() * x.element_size() + 1 * 8 * 16 * 8  # x, then O(N C) float64
