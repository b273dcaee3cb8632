"""Batch-Instance Normalization (Nam & Kim 2018): its BN and IN limits, the gate, the NumPy reference."""
import numpy as np
import pytest
import torch

import normzoo
import normzoo.reference as R
from normzoo import nn as znn
from normzoo.nn.batch_instance import batch_instance_norm, bin_param_groups

TOL = dict(rtol=1e-4, atol=2e-5)
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _randomize(module, gen):
    with torch.no_grad():
        for p in (module.weight, module.bias):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)


def _steps(modules, shape, gen, steps, train=True):
    for m in modules:
        m.train(train)
    for _ in range(steps):
        x = torch.randn(shape, generator=gen) * 2 + 1.5
        xs = [x.clone().requires_grad_() for _ in modules]
        ys = [m(xi) for m, xi in zip(modules, xs)]
        g = torch.randn(shape, generator=gen)
        for y in ys:
            y.backward(g)
        for y, xi in zip(ys[1:], xs[1:]):
            torch.testing.assert_close(ys[0], y, **TOL)
            torch.testing.assert_close(xs[0].grad, xi.grad, **TOL)
        for m in modules[1:]:
            torch.testing.assert_close(modules[0].weight.grad, m.weight.grad, **TOL)
            torch.testing.assert_close(modules[0].bias.grad, m.bias.grad, **TOL)


@pytest.mark.parametrize("cls,torch_bn,ours_bn,shape", [
    (znn.BatchInstanceNorm2d, torch.nn.BatchNorm2d, znn.BatchNorm2d, (4, 3, 5, 4)),
    (znn.BatchInstanceNorm1d, torch.nn.BatchNorm1d, znn.BatchNorm1d, (5, 3, 7)),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_rho_one_is_batchnorm(cls, torch_bn, ours_bn, shape, momentum):
    gen = torch.Generator().manual_seed(0)
    theirs = torch_bn(3, momentum=momentum)
    _randomize(theirs, gen)
    ours, bn = cls(3, momentum=momentum), ours_bn(3, momentum=momentum)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert missing == ["rho"] and unexpected == []  # the gate is the only extra key; it starts at 1
    bn.load_state_dict(theirs.state_dict())
    _steps([ours, theirs, bn], shape, gen, 3)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
    _steps([ours, theirs, bn], shape, gen, 1, train=False)


def test_rho_zero_is_instancenorm_in_train_and_eval():
    gen = torch.Generator().manual_seed(1)
    ours = znn.BatchInstanceNorm2d(3)
    theirs = torch.nn.InstanceNorm2d(3, affine=True)
    _randomize(theirs, gen)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    with torch.no_grad():
        ours.rho.zero_()
    _steps([ours, theirs], (4, 3, 5, 4), gen, 2)
    ours.eval()
    _steps([ours, theirs], (4, 3, 5, 4), gen, 1, train=False)  # eval: instance statistics, as IN


@pytest.mark.parametrize("mode", ["train", "test"])
def test_matches_numpy_reference(mode):
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (3, 4, 5, 3))
    gamma, beta, rho = rng.uniform(0.5, 1.5, 4), rng.normal(size=4), rng.uniform(0, 1, 4)
    mu, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    dout = rng.normal(size=x.shape)
    param = {"mode": mode, "momentum": 0.7, "running_mean": mu.copy(), "running_var": var.copy(), "unbiased": True}
    out, cache = R.batchinstancenorm_forward(x, gamma, beta, rho, param)
    dx, dgamma, dbeta, drho = R.batchinstancenorm_backward(dout, cache)
    m = znn.BatchInstanceNorm2d(4, momentum=0.3).double().train(mode == "train")
    with torch.no_grad():
        for p, v in ((m.weight, gamma), (m.bias, beta), (m.rho, rho), (m.running_mean, mu), (m.running_var, var)):
            p.copy_(torch.from_numpy(v))
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt)
    y.backward(torch.from_numpy(dout))
    for ours, ref in ((y, out), (xt.grad, dx), (m.weight.grad, dgamma), (m.bias.grad, dbeta), (m.rho.grad, drho),
                      (m.running_mean, param["running_mean"]), (m.running_var, param["running_var"])):
        np.testing.assert_allclose(ours.detach().numpy(), ref, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    rm, rv = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b, r: batch_instance_norm(x, r, None, None, w, b, True), (x, w, b, rho))
    assert torch.autograd.gradcheck(lambda x, w, b, r: batch_instance_norm(x, r, rm, rv, w, b, False), (x, w, b, rho))
    assert torch.autograd.gradcheck(lambda x, r: batch_instance_norm(x, r, training=True), (x, rho))
    x1 = torch.randn(4, 2, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)  # 1x1: IN branch is 0
    assert torch.autograd.gradcheck(lambda x, w, b, r: batch_instance_norm(x, r, None, None, w, b, True), (x1, w, b, rho))


def test_one_by_one_input_has_no_nan():
    m = znn.BatchInstanceNorm2d(3)
    with torch.no_grad():
        m.rho.fill_(0.25)
    x = torch.randn(5, 3, 1, 1, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(m.rho.grad).all()
    bn = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
    torch.testing.assert_close(y.detach(), 0.25 * bn, **TOL)  # x_IN = 0 on a single position


def test_gate_is_kept_in_unit_interval():
    m = znn.BatchInstanceNorm2d(3)
    x = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        m.rho.copy_(torch.tensor([1.7, -0.3, 0.4]))
    m.eval()
    y_eval = m(x)  # eval does not touch the parameter, but uses the clamped gate
    assert torch.equal(m.rho.detach(), torch.tensor([1.7, -0.3, 0.4]))
    ref = batch_instance_norm(x, torch.tensor([1.0, 0.0, 0.4]), m.running_mean, m.running_var, m.weight, m.bias)
    torch.testing.assert_close(y_eval, ref)
    m.train()
    m(x)  # a training forward projects the parameter: the paper's clip after the update
    assert torch.equal(m.rho.detach(), torch.tensor([1.0, 0.0, 0.4]))
    # an SGD step that pushes rho past 1 is clipped back before it is used (projected gradient descent)
    opt = torch.optim.SGD([m.rho], lr=100.0)
    (-(m(x) * torch.randn_like(x)).sum() - 10 * m.rho.sum()).backward()
    grad = m.rho.grad.clone()
    opt.step()
    expected = (torch.tensor([1.0, 0.0, 0.4]) - 100.0 * grad).clamp(0, 1)
    m(x)
    torch.testing.assert_close(m.rho.detach(), expected)


def test_straight_through_gradient_of_the_clamp():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    inside = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    outside = torch.tensor([1.5, -2.0], dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    (batch_instance_norm(x, inside, training=True) * g).sum().backward()
    (batch_instance_norm(x, outside, training=True) * g).sum().backward()
    torch.testing.assert_close(outside.grad, inside.grad)
    assert inside.grad.abs().min() > 0


def test_param_groups_raise_the_gate_learning_rate():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), znn.BatchInstanceNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 1), normzoo.create("bin2d", 4))
    groups = bin_param_groups(model, lr=0.1)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(1.0) and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(model[1].rho), id(model[4].rho)}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    opt.step()
    assert len(bin_param_groups(torch.nn.Linear(2, 2), lr=0.1)) == 1  # no gates: one group
    assert "weight_decay" not in bin_param_groups(model, lr=0.1, rho_weight_decay=None)[1]
    with pytest.raises(ValueError, match="rho_lr_mult"):
        bin_param_groups(model, lr=0.1, rho_lr_mult=-1)


def test_checkpoints_and_conventions():
    m = normzoo.create("bin2d", 4)
    assert isinstance(m, znn.BatchInstanceNorm2d) and float(m.rho.detach().min()) == 1.0
    state = {k: v for k, v in m.state_dict().items() if k != "rho"}
    state["gate"] = torch.full((4,), 0.3)  # the official code's name for the gate
    m.load_state_dict(state)
    assert torch.allclose(m.rho.detach(), torch.full((4,), 0.3))
    m.reset_parameters()
    assert float(m.rho.detach().min()) == 1.0 and float(m.running_var.sum()) == 4
    assert set(m.state_dict()) == {"weight", "bias", "rho", "running_mean", "running_var", "num_batches_tracked"}
    nt = znn.BatchInstanceNorm2d(4, affine=False, track_running_stats=False).eval()
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(nt(x), torch.nn.functional.batch_norm(x, None, None, training=True), **TOL)
    with pytest.raises(ValueError, match="BatchInstanceNorm2d: expected 4D input"):
        m(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m.train()(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError, match="rho"):
        batch_instance_norm(x, torch.ones(3))


def test_constant_channel_is_beta():
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 7.0
    m = znn.BatchInstanceNorm2d(3)
    with torch.no_grad():
        m.rho.fill_(0.6), m.bias.fill_(0.25)
    x.requires_grad_()
    y = m(x)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(y[:, 1].detach(), torch.full((4, 5, 5), 0.25))


def test_saved_for_backward_is_the_input_plus_small_statistics():
    from test_core_memory import saved_bytes

    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    m = znn.BatchInstanceNorm2d(16)
    assert saved_bytes(m, x) <= x.numel() * x.element_size() + 4 * 8 * 16 * 8  # x, then O(N C) float64
