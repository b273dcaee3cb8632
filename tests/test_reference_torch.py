"""normzoo.reference against PyTorch's own autograd (float64).

The classic layers are compared with ``torch.nn.functional``; Batch Renorm, Batch-Instance Norm and
Switchable Norm, which torch lacks, with their paper formulas written directly in torch ops, so that
autograd (not a hand derivation) supplies the gradients.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import normzoo.reference as R  # noqa: E402

torch.set_num_threads(1)
RTOL, ATOL = 1e-10, 1e-12


def t(a: np.ndarray) -> "torch.Tensor":
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def torch_grads(fn: Callable[..., "torch.Tensor"], inputs: Sequence[np.ndarray], dout: np.ndarray):
    """Output of ``fn(*inputs)`` and the gradients of ``sum(out * dout)`` for every input."""
    ts = [t(a) for a in inputs]
    out = fn(*ts)
    out.backward(torch.from_numpy(dout))
    return out.detach().numpy(), [x.grad.numpy() for x in ts]


def assert_match(ours, theirs) -> None:
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def case(seed: int, shape, scale: float = 2.0, shift: float = 1.0):
    g = np.random.default_rng(seed)
    C = shape[1]
    return (g, scale * g.standard_normal(shape) + shift, 1 + 0.5 * g.standard_normal(C), g.standard_normal(C),
            g.standard_normal(C), 0.5 + g.random(C))


def bcast(v, ndim: int):
    """(C,) torch tensor -> (1, C, 1, ...)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


# ----------------------------------------------------------------------------- torch.nn.functional

@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_torch(shape, training):
    g, x, gamma, beta, rm, rv = case(0, shape)
    dout = g.standard_normal(shape)
    # reference momentum 0.9 with unbiased running variance == torch momentum 0.1
    bn_param = {"mode": "train" if training else "test", "momentum": 0.9, "unbiased": True, "eps": 1e-4,
                "running_mean": rm.copy(), "running_var": rv.copy()}
    if len(shape) == 2:
        out, cache = R.batchnorm_forward(x, gamma, beta, bn_param)
        grads = R.batchnorm_backward(dout, cache)
    else:
        out, cache = R.spatial_batchnorm_forward(x, gamma, beta, bn_param)
        grads = R.spatial_batchnorm_backward(dout, cache)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    t_out, t_grads = torch_grads(lambda a, w, b: F.batch_norm(a, trm, trv, w, b, training=training, momentum=0.1,
                                                              eps=1e-4), (x, gamma, beta), dout)
    assert_match([out, *grads], [t_out, *t_grads])
    np.testing.assert_allclose(bn_param["running_mean"], trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], trv.numpy(), rtol=1e-12)


@pytest.mark.parametrize("x_shape,p_shape", [((5, 8), (8,)), ((2, 3, 4, 5), (4, 5))])
def test_layernorm_matches_torch(x_shape, p_shape):
    g = np.random.default_rng(1)
    x = 3 * g.standard_normal(x_shape) - 2
    gamma, beta = 1 + 0.5 * g.standard_normal(p_shape), g.standard_normal(p_shape)
    dout = g.standard_normal(x_shape)
    out, cache = R.layernorm_forward(x, gamma, beta, {"eps": 1e-3})
    grads = R.layernorm_backward(dout, cache)
    ref = torch_grads(lambda a, w, b: F.layer_norm(a, p_shape, w, b, eps=1e-3), (x, gamma, beta), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 4, 3, 3), (2, 2, 2, 3, 2)])
def test_instancenorm_matches_torch(shape):
    g, x, gamma, beta, _, _ = case(2, shape)
    dout = g.standard_normal(shape)
    out, cache = R.instancenorm_forward(x, gamma, beta, {"eps": 1e-4})
    grads = R.instancenorm_backward(dout, cache)
    ref = torch_grads(lambda a, w, b: F.instance_norm(a, weight=w, bias=b, use_input_stats=True, eps=1e-4),
                      (x, gamma, beta), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])


@pytest.mark.parametrize("G", [1, 2, 3, 6])
def test_groupnorm_matches_torch(G):
    shape = (2, 6, 3, 4)
    g, x, gamma, beta, _, _ = case(3, shape)
    dout = g.standard_normal(shape)
    out, cache = R.spatial_groupnorm_forward(x, gamma, beta, G, {"eps": 1e-4})
    grads = R.spatial_groupnorm_backward(dout, cache)
    ref = torch_grads(lambda a, w, b: F.group_norm(a, G, w, b, eps=1e-4), (x, gamma, beta), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("x_shape,p_shape", [((5, 8), (8,)), ((2, 3, 4), (3, 4))])
def test_rmsnorm_matches_torch(eps, x_shape, p_shape):
    g = np.random.default_rng(4)
    x = 2 * g.standard_normal(x_shape) + 0.5
    gamma = 1 + 0.5 * g.standard_normal(p_shape)
    dout = g.standard_normal(x_shape)
    out, cache = R.rmsnorm_forward(x, gamma, {"eps": eps})
    grads = R.rmsnorm_backward(dout, cache)
    ref = torch_grads(lambda a, w: F.rms_norm(a, p_shape, w, eps=eps), (x, gamma), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])


# ----------------------------------------------------------------------------- paper formulas in torch

def brn_torch(x, w, b, mu, var, eps, r_max, d_max):
    """Batch Renorm, train mode, straight from the paper (r and d detached)."""
    axes = [0] + list(range(2, x.dim()))
    mu_b = x.mean(axes, keepdim=True)
    sigma_b = torch.sqrt(x.var(axes, unbiased=False, keepdim=True) + eps)
    sigma = torch.sqrt(bcast(var, x.dim()) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - bcast(mu, x.dim())) / sigma).clamp(-d_max, d_max).detach()
    return bcast(w, x.dim()) * ((x - mu_b) / sigma_b * r + d) + bcast(b, x.dim())


@pytest.mark.parametrize("shape", [(8, 3), (3, 4, 3, 2)])
@pytest.mark.parametrize("r_max,d_max", [(1e3, 1e3), (1.2, 0.2), (1.0, 0.0)])
def test_batchrenorm_matches_torch_autograd_with_detached_r_and_d(shape, r_max, d_max):
    g, x, gamma, beta, rm, rv = case(5, shape)
    rv = rv * 2.0  # some channels clipped, some not, for the middle limits
    dout = g.standard_normal(shape)
    p = {"mode": "train", "r_max": r_max, "d_max": d_max, "eps": 1e-4, "running_mean": rm, "running_var": rv}
    out, cache = R.batchrenorm_forward(x, gamma, beta, p)
    grads = R.batchrenorm_backward(dout, cache)
    mu, var = torch.tensor(rm), torch.tensor(rv)
    ref = torch_grads(lambda a, w, b: brn_torch(a, w, b, mu, var, 1e-4, r_max, d_max), (x, gamma, beta), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])


def bin_torch(x, w, b, rho, mu, var, eps, training):
    """Batch-Instance Norm straight from the paper."""
    nd = x.dim()
    axes_bn, axes_in = [0] + list(range(2, nd)), list(range(2, nd))
    if training:
        mu, var = x.mean(axes_bn, keepdim=True), x.var(axes_bn, unbiased=False, keepdim=True)
    else:
        mu, var = bcast(mu, nd), bcast(var, nd)
    x_bn = (x - mu) / torch.sqrt(var + eps)
    x_in = (x - x.mean(axes_in, keepdim=True)) / torch.sqrt(x.var(axes_in, unbiased=False, keepdim=True) + eps)
    rho = bcast(rho, nd)
    return (rho * x_bn + (1 - rho) * x_in) * bcast(w, nd) + bcast(b, nd)


@pytest.mark.parametrize("training", [True, False])
def test_batchinstancenorm_matches_torch_autograd(training):
    shape = (3, 4, 3, 2)
    g, x, gamma, beta, rm, rv = case(6, shape)
    rho = g.random(4)
    dout = g.standard_normal(shape)
    p = {"mode": "train" if training else "test", "eps": 1e-4, "running_mean": rm, "running_var": rv}
    out, cache = R.batchinstancenorm_forward(x, gamma, beta, rho, p)
    grads = R.batchinstancenorm_backward(dout, cache)
    mu, var = torch.tensor(rm), torch.tensor(rv)
    ref = torch_grads(lambda a, w, b, r: bin_torch(a, w, b, r, mu, var, 1e-4, training), (x, gamma, beta, rho), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])


def sn_torch(x, w, b, mean_w, var_w, mu_run, var_run, eps, training):
    """Switchable Norm straight from the paper: LN and BN statistics from the IN ones."""
    nd = x.dim()
    sp = list(range(2, nd))
    mu_in = x.mean(sp, keepdim=True)
    var_in = x.var(sp, unbiased=False, keepdim=True)
    temp = var_in + mu_in ** 2
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = temp.mean(1, keepdim=True) - mu_ln ** 2
    if training:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = temp.mean(0, keepdim=True) - mu_bn ** 2
    else:
        mu_bn, var_bn = bcast(mu_run, nd), bcast(var_run, nd)
    p, q = torch.softmax(mean_w, 0), torch.softmax(var_w, 0)
    mean = p[0] * mu_in + p[1] * mu_ln + p[2] * mu_bn
    var = q[0] * var_in + q[1] * var_ln + q[2] * var_bn
    return bcast(w, nd) * (x - mean) / torch.sqrt(var + eps) + bcast(b, nd)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 3, 2), (2, 3, 5)])
def test_switchnorm_matches_torch_autograd(training, shape):
    g, x, gamma, beta, rm, rv = case(7, shape)
    mean_w, var_w = g.standard_normal(3), g.standard_normal(3)
    dout = g.standard_normal(shape)
    p = {"mode": "train" if training else "test", "eps": 1e-4, "running_mean": rm.copy(), "running_var": rv.copy()}
    out, cache = R.switchnorm_forward(x, gamma, beta, mean_w, var_w, p)
    grads = R.switchnorm_backward(dout, cache)
    mu, var = torch.tensor(rm), torch.tensor(rv)
    ref = torch_grads(lambda a, w, b, mw, vw: sn_torch(a, w, b, mw, vw, mu, var, 1e-4, training),
                      (x, gamma, beta, mean_w, var_w), dout)
    assert_match([out, *grads], [ref[0], *ref[1]])
    if training:  # running statistics track the BN-branch statistics (CS231n momentum 0.9, biased)
        axes = (0,) + tuple(range(2, len(shape)))
        np.testing.assert_allclose(p["running_mean"], 0.9 * rm + 0.1 * x.mean(axis=axes), rtol=1e-12)
        np.testing.assert_allclose(p["running_var"], 0.9 * rv + 0.1 * x.var(axis=axes), rtol=1e-12)
