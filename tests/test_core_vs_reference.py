"""normzoo's PyTorch layers agree with the hand-derived NumPy reference (float64): outputs, input and
parameter gradients, and running statistics (with the reference's CS231n momentum = 1 - torch momentum)."""
import numpy as np
import pytest
import torch

from normzoo import nn as znn
from normzoo import reference as R


def _torch_fwd_bwd(module, x, dout):
    xt = torch.tensor(x, requires_grad=True)
    y = module(xt)
    y.backward(torch.tensor(dout))
    grads = [p.grad.numpy() for p in module.parameters()]
    return y.detach().numpy(), xt.grad.numpy(), grads


def _set(module, gamma, beta=None):
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma).reshape(module.weight.shape))
        if beta is not None:
            module.bias.copy_(torch.tensor(beta).reshape(module.bias.shape))
    return module


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_batchnorm1d_and_running_stats(rng):
    x, dout = rng.normal(2, 3, (16, 5)), rng.normal(size=(16, 5))
    gamma, beta = rng.normal(1, 0.2, 5), rng.normal(size=5)
    bn = _set(znn.BatchNorm1d(5).double(), gamma, beta)
    bn_param = {"mode": "train", "momentum": 0.9, "unbiased": True}
    for step in range(3):
        xs = x + step
        out, cache = R.batchnorm_forward(xs, gamma, beta, bn_param)
        y, dx, (dg, db) = _torch_fwd_bwd(bn, xs, dout)
        rdx, rdg, rdb = R.batchnorm_backward(dout, cache)
        np.testing.assert_allclose(y, out, atol=1e-10)
        np.testing.assert_allclose(dx, rdx, atol=1e-10)
        np.testing.assert_allclose(dg, rdg, atol=1e-10)
        np.testing.assert_allclose(db, rdb, atol=1e-10)
        bn.zero_grad()
    np.testing.assert_allclose(bn.running_mean.numpy(), bn_param["running_mean"], atol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), bn_param["running_var"], atol=1e-12)
    bn.eval()
    out, _ = R.batchnorm_forward(x, gamma, beta, {**bn_param, "mode": "test"})
    np.testing.assert_allclose(bn(torch.tensor(x)).detach().numpy(), out, atol=1e-10)


def test_spatial_batchnorm(rng):
    x, dout = rng.normal(-1, 2, (4, 3, 5, 6)), rng.normal(size=(4, 3, 5, 6))
    gamma, beta = rng.normal(1, 0.2, 3), rng.normal(size=3)
    out, cache = R.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    y, dx, (dg, db) = _torch_fwd_bwd(_set(znn.BatchNorm2d(3).double(), gamma, beta), x, dout)
    rdx, rdg, rdb = R.spatial_batchnorm_backward(dout, cache)
    for a, b in [(y, out), (dx, rdx), (dg, rdg), (db, rdb)]:
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_layernorm(rng):
    x, dout = rng.normal(3, 2, (6, 10)), rng.normal(size=(6, 10))
    gamma, beta = rng.normal(1, 0.2, 10), rng.normal(size=10)
    out, cache = R.layernorm_forward(x, gamma, beta, {"eps": 1e-5})
    y, dx, (dg, db) = _torch_fwd_bwd(_set(znn.LayerNorm(10).double(), gamma, beta), x, dout)
    rdx, rdg, rdb = R.layernorm_backward(dout, cache)
    for a, b in [(y, out), (dx, rdx), (dg, rdg), (db, rdb)]:
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_instancenorm(rng):
    x, dout = rng.normal(1, 2, (3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
    gamma, beta = rng.normal(1, 0.2, 4), rng.normal(size=4)
    out, cache = R.instancenorm_forward(x, gamma, beta, {"eps": 1e-5})
    y, dx, (dg, db) = _torch_fwd_bwd(_set(znn.InstanceNorm2d(4, affine=True).double(), gamma, beta), x, dout)
    rdx, rdg, rdb = R.instancenorm_backward(dout, cache)
    for a, b in [(y, out), (dx, rdx), (dg, rdg), (db, rdb)]:
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_groupnorm(rng):
    x, dout = rng.normal(0.5, 2, (3, 6, 4, 5)), rng.normal(size=(3, 6, 4, 5))
    gamma, beta = rng.normal(1, 0.2, 6), rng.normal(size=6)
    out, cache = R.spatial_groupnorm_forward(x, gamma, beta, 3, {"eps": 1e-5})
    y, dx, (dg, db) = _torch_fwd_bwd(_set(znn.GroupNorm(3, 6).double(), gamma, beta), x, dout)
    rdx, rdg, rdb = R.spatial_groupnorm_backward(dout, cache)
    for a, b in [(y, out), (dx, rdx), (dg, np.ravel(rdg)), (db, np.ravel(rdb))]:
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_rmsnorm(rng):
    x, dout = rng.normal(1, 2, (5, 8)), rng.normal(size=(5, 8))
    gamma = rng.normal(1, 0.2, 8)
    out, cache = R.rmsnorm_forward(x, gamma, {"eps": 1e-6})
    y, dx, (dg,) = _torch_fwd_bwd(_set(znn.RMSNorm(8, eps=1e-6).double(), gamma), x, dout)
    rdx, rdg = R.rmsnorm_backward(dout, cache)
    for a, b in [(y, out), (dx, rdx), (dg, rdg)]:
        np.testing.assert_allclose(a, b, atol=1e-10)
