"""Tests of normzoo.reference: gradient checks, CS231n sanity checks, conventions, identities, errors.

Every analytic backward is compared with centered differences (rel_error < 1e-7 in float64).
The comparison with PyTorch's autograd lives in test_reference_torch.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normzoo.reference as R

TOL = 1e-7
ROOT = Path(__file__).resolve().parents[1]


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def channel_case(seed: int, shape=(3, 4, 3, 2), scale=1.5, shift=0.5):
    """An (N, C, *spatial) input with per-channel gamma/beta and random running statistics."""
    g = rng(seed)
    C = shape[1]
    x = scale * g.standard_normal(shape) + shift
    gamma = 1.0 + 0.5 * g.standard_normal(C)
    beta = g.standard_normal(C)
    running = {"running_mean": g.standard_normal(C), "running_var": 0.5 + g.random(C)}
    return g, x, gamma, beta, running


def assert_grads_ok(errors: dict) -> None:
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {errors}"


# ----------------------------------------------------------------------------- gradient checks

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("backward", [R.batchnorm_backward, R.batchnorm_backward_alt])
def test_batchnorm_gradients(seed, mode, backward):
    g = rng(seed)
    x = 2.0 * g.standard_normal((5, 4)) + 3.0
    gamma, beta = 1.0 + 0.5 * g.standard_normal(4), g.standard_normal(4)
    bn_param = {"mode": mode, "running_mean": 3.0 + g.standard_normal(4), "running_var": 3.0 + g.random(4)}
    assert_grads_ok(R.check_layer(R.batchnorm_forward, backward, (x, gamma, beta), bn_param, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_spatial_batchnorm_gradients(seed, mode):
    _, x, gamma, beta, running = channel_case(seed)
    bn_param = {"mode": mode, **running}
    assert_grads_ok(R.check_layer(R.spatial_batchnorm_forward, R.spatial_batchnorm_backward,
                                  (x, gamma, beta), bn_param, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("x_shape,p_shape", [((4, 6), (6,)), ((2, 3, 4), (3, 4))])
def test_layernorm_gradients(seed, x_shape, p_shape):
    g = rng(seed)
    x = 2.0 * g.standard_normal(x_shape) - 1.0
    gamma, beta = 1.0 + 0.5 * g.standard_normal(p_shape), g.standard_normal(p_shape)
    assert_grads_ok(R.check_layer(R.layernorm_forward, R.layernorm_backward, (x, gamma, beta), {}, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_instancenorm_gradients(seed):
    _, x, gamma, beta, _ = channel_case(seed)
    assert_grads_ok(R.check_layer(R.instancenorm_forward, R.instancenorm_backward, (x, gamma, beta), {},
                                  seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("param_shape", ["flat", "cs231n"])
def test_groupnorm_gradients(seed, G, param_shape):
    _, x, gamma, beta, _ = channel_case(seed)
    if param_shape == "cs231n":
        gamma, beta = gamma.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1)
    assert_grads_ok(R.check_layer(R.spatial_groupnorm_forward, R.spatial_groupnorm_backward,
                                  (x, gamma, beta), G, {}, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rmsnorm_gradients(seed, eps):
    g = rng(seed)
    x = 2.0 * g.standard_normal((4, 6)) + 0.5
    gamma = 1.0 + 0.5 * g.standard_normal(6)
    assert_grads_ok(R.check_layer(R.rmsnorm_forward, R.rmsnorm_backward, (x, gamma), {"eps": eps}, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_batchrenorm_gradients_where_r_and_d_are_clipped(seed, mode):
    """r and d are stop-gradient; they are also locally constant where clipped, so the numerical
    gradient of the forward equals the analytic one there (the unclipped case is checked against
    torch autograd with detached r, d)."""
    _, x, gamma, beta, _ = channel_case(seed)
    mu_b, sd_b = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    # running sigma 10x the batch sigma (r -> 1/r_max) and running mean 3 sigma off (d -> -d_max)
    brn_param = {"mode": mode, "r_max": 2.0, "d_max": 0.5,
                 "running_mean": mu_b + 3 * 10 * sd_b, "running_var": (10 * sd_b) ** 2}
    _, cache = R.batchrenorm_forward(x, gamma, beta, dict(brn_param))
    if mode == "train":
        np.testing.assert_allclose(cache.r.ravel(), 0.5)
        np.testing.assert_allclose(cache.d.ravel(), -0.5)
    assert_grads_ok(R.check_layer(R.batchrenorm_forward, R.batchrenorm_backward, (x, gamma, beta), brn_param,
                                  seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_batchinstancenorm_gradients(seed, mode):
    g, x, gamma, beta, running = channel_case(seed)
    rho = 0.1 + 0.8 * g.random(x.shape[1])
    assert_grads_ok(R.check_layer(R.batchinstancenorm_forward, R.batchinstancenorm_backward,
                                  (x, gamma, beta, rho), {"mode": mode, **running}, seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_switchnorm_gradients(seed, mode):
    g, x, gamma, beta, running = channel_case(seed)
    mean_w, var_w = g.standard_normal(3), g.standard_normal(3)
    errors = R.check_layer(R.switchnorm_forward, R.switchnorm_backward, (x, gamma, beta, mean_w, var_w),
                           {"mode": mode, **running}, seed=seed)
    assert set(errors) == {"x", "gamma", "beta", "mean_weight", "var_weight"}
    assert_grads_ok(errors)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_batchnorm_backward_alt_equals_batchnorm_backward(mode):
    g = rng(3)
    x = 5.0 * g.standard_normal((50, 7)) + 12.0
    gamma, beta = g.standard_normal(7), g.standard_normal(7)
    dout = g.standard_normal((50, 7))
    bn_param = {"mode": mode, "running_mean": 12.0 + g.standard_normal(7), "running_var": 20.0 + g.random(7)}
    _, cache = R.batchnorm_forward(x, gamma, beta, bn_param)
    for a, b in zip(R.batchnorm_backward(dout, cache), R.batchnorm_backward_alt(dout, cache)):
        assert R.rel_error(a, b) < 1e-10


# ----------------------------------------------------------------------------- CS231n sanity checks

def _two_layer_activations(g: np.random.Generator, W1: np.ndarray, W2: np.ndarray, N: int) -> np.ndarray:
    X = g.standard_normal((N, W1.shape[0]))
    return np.maximum(0, X @ W1) @ W2


def test_batchnorm_train_mode_sanity():
    g = rng(231)
    W1, W2 = g.standard_normal((50, 60)), g.standard_normal((60, 3))
    a = _two_layer_activations(g, W1, W2, 200)
    assert np.all(np.abs(a.mean(axis=0)) > 1.0)  # far from standardized before the layer
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([11.0, 12.0, 13.0])
    out, _ = R.batchnorm_forward(a, gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=0), beta, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.std(axis=0), gamma, rtol=1e-6)


def test_batchnorm_test_mode_sanity_after_training():
    g = rng(232)
    W1, W2 = g.standard_normal((50, 60)), g.standard_normal((60, 3))
    N = 200
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([-1.0, 0.0, 4.0])
    bn_param = {"mode": "train"}
    for _ in range(50):
        R.batchnorm_forward(_two_layer_activations(g, W1, W2, N), gamma, beta, bn_param)
    bn_param["mode"] = "test"
    out, _ = R.batchnorm_forward(_two_layer_activations(g, W1, W2, N), gamma, beta, bn_param)
    # a fresh batch's mean differs from the population mean by about sigma / sqrt(N)
    assert np.all(np.abs(out.mean(axis=0) - beta) < 4 * gamma / np.sqrt(N))
    assert np.all(np.abs(out.std(axis=0) / gamma - 1) < 0.2)


# ----------------------------------------------------------------------------- conventions

def test_momentum_is_the_fraction_of_the_old_running_value_kept():
    g = rng(5)
    x = g.standard_normal((8, 3)) * 2 + 1
    mean, var = x.mean(axis=0), x.var(axis=0)
    p = {"mode": "train"}                                          # defaults: 0.9, zeros/ones
    R.batchnorm_forward(x, np.ones(3), np.zeros(3), p)
    np.testing.assert_allclose(p["running_mean"], 0.1 * mean)
    np.testing.assert_allclose(p["running_var"], 0.9 + 0.1 * var)
    p = {"mode": "train", "momentum": 0.0}
    R.batchnorm_forward(x, np.ones(3), np.zeros(3), p)
    np.testing.assert_allclose(p["running_mean"], mean)
    np.testing.assert_allclose(p["running_var"], var)
    p = {"mode": "train", "momentum": 0.0, "unbiased": True}
    R.batchnorm_forward(x, np.ones(3), np.zeros(3), p)
    np.testing.assert_allclose(p["running_var"], x.var(axis=0, ddof=1))


def test_running_statistics_are_replaced_not_mutated():
    x = rng(6).standard_normal((4, 2, 3))
    old_mean, old_var = np.zeros(2), np.ones(2)
    for fwd, args in [(R.spatial_batchnorm_forward, ()), (R.batchrenorm_forward, ()),
                      (R.batchinstancenorm_forward, (np.full(2, 0.5),)),
                      (R.switchnorm_forward, (np.zeros(3), np.zeros(3)))]:
        p = {"mode": "train", "running_mean": old_mean, "running_var": old_var}
        fwd(x, np.ones(2), np.zeros(2), *args, p)
        assert not np.allclose(p["running_mean"], 0.0), fwd.__name__
        np.testing.assert_array_equal(old_mean, 0.0)
        np.testing.assert_array_equal(old_var, 1.0)


def test_test_mode_uses_running_statistics_and_leaves_them_alone():
    g = rng(7)
    x = g.standard_normal((6, 3))
    p = {"mode": "test", "running_mean": g.standard_normal(3), "running_var": 1 + g.random(3), "eps": 1e-3}
    before = {k: v.copy() for k, v in p.items() if k != "mode" and k != "eps"}
    out, _ = R.batchnorm_forward(x, 2 * np.ones(3), np.ones(3), p)
    np.testing.assert_allclose(out, 2 * (x - before["running_mean"]) / np.sqrt(before["running_var"] + 1e-3) + 1)
    np.testing.assert_array_equal(p["running_mean"], before["running_mean"])


def test_default_test_mode_before_training_is_identity_up_to_eps():
    x = rng(8).standard_normal((5, 4))
    out, _ = R.batchnorm_forward(x, np.ones(4), np.zeros(4), {"mode": "test"})
    np.testing.assert_allclose(out, x / np.sqrt(1 + 1e-5))


def test_statistics_stay_accurate_for_large_means():
    """A channel with mean 1e4 and std 1e-2 still normalizes correctly (no E[x^2] - E[x]^2)."""
    g = rng(9)
    x = 1e4 + 1e-2 * g.standard_normal((4, 3, 5, 5))
    ones, zeros = np.ones(3), np.zeros(3)
    out, _ = R.spatial_batchnorm_forward(x, ones, zeros, {"mode": "train", "eps": 1e-12})
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1.0, rtol=1e-6)
    out, _ = R.switchnorm_forward(x, ones, zeros, np.zeros(3), np.array([0.0, 0.0, 5.0]),
                                  {"mode": "train", "eps": 1e-12})
    assert np.all(np.isfinite(out))
    assert 0.5 < out.std() < 2.0


# ----------------------------------------------------------------------------- identities between methods

def test_batchrenorm_with_rmax_1_dmax_0_is_batchnorm():
    g, x, gamma, beta, running = channel_case(10)
    dout = g.standard_normal(x.shape)
    p_bn, p_brn = {"mode": "train", **running}, {"mode": "train", "r_max": 1.0, "d_max": 0.0, **running}
    out_bn, c_bn = R.spatial_batchnorm_forward(x, gamma, beta, p_bn)
    out_brn, c_brn = R.batchrenorm_forward(x, gamma, beta, p_brn)
    np.testing.assert_allclose(out_brn, out_bn, rtol=1e-12, atol=1e-12)
    for a, b in zip(R.batchrenorm_backward(dout, c_brn), R.spatial_batchnorm_backward(dout, c_bn)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for k in ("running_mean", "running_var"):
        np.testing.assert_allclose(p_brn[k], p_bn[k], rtol=1e-12)


def test_batchrenorm_unclipped_training_output_equals_running_normalization():
    """x_hat * r + d = (x - mu) / sigma when nothing is clipped, using the pre-update statistics."""
    _, x, gamma, beta, running = channel_case(11)
    p = {"mode": "train", "r_max": 1e6, "d_max": 1e6, **running}
    out, cache = R.batchrenorm_forward(x, gamma, beta, p)
    mu, sigma = running["running_mean"], np.sqrt(running["running_var"] + 1e-5)
    expected = gamma[:, None, None] * (x - mu[:, None, None]) / sigma[:, None, None] + beta[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
    sigma_b = np.sqrt(x.var(axis=(0, 2, 3)) + 1e-5)
    np.testing.assert_allclose(cache.r.ravel(), sigma_b / sigma)
    # the running statistics moved after r and d were computed
    np.testing.assert_allclose(p["running_mean"], 0.9 * mu + 0.1 * x.mean(axis=(0, 2, 3)))


def test_batchinstancenorm_endpoints_are_batchnorm_and_instancenorm():
    _, x, gamma, beta, running = channel_case(12)
    C = x.shape[1]
    out_bin, _ = R.batchinstancenorm_forward(x, gamma, beta, np.ones(C), {"mode": "train", **running})
    out_bn, _ = R.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train", **running})
    np.testing.assert_allclose(out_bin, out_bn, rtol=1e-12, atol=1e-12)
    out_bin, _ = R.batchinstancenorm_forward(x, gamma, beta, np.zeros(C), {"mode": "test", **running})
    out_in, _ = R.instancenorm_forward(x, gamma, beta, {})
    np.testing.assert_allclose(out_bin, out_in, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_switchnorm_with_one_hot_weights_is_in_ln_or_bn(which):
    _, x, gamma, beta, running = channel_case(13)
    logits = np.zeros(3)
    logits[which] = 60.0                                   # softmax = one-hot to within 1e-26
    out, _ = R.switchnorm_forward(x, gamma, beta, logits, logits, {"mode": "train", **running})
    if which == 0:
        expected, _ = R.instancenorm_forward(x, gamma, beta, {})
    elif which == 1:                                       # layer norm over (C, *spatial), per-channel affine
        expected, _ = R.spatial_groupnorm_forward(x, gamma, beta, 1, {})
    else:
        expected, _ = R.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train", **running})
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_switchnorm_test_mode_uses_running_batch_statistics():
    _, x, gamma, beta, running = channel_case(14)
    logits = np.array([-60.0, -60.0, 60.0])
    out, _ = R.switchnorm_forward(x, gamma, beta, logits, logits, {"mode": "test", **running})
    expected, _ = R.spatial_batchnorm_forward(x, gamma, beta, {"mode": "test", **running})
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_groupnorm_extremes_are_layernorm_and_instancenorm():
    _, x, gamma, beta, _ = channel_case(15)
    N, C = x.shape[:2]
    out_g1, _ = R.spatial_groupnorm_forward(x, np.ones(C), np.zeros(C), 1, {})
    out_ln, _ = R.layernorm_forward(x.reshape(N, -1), np.ones(x[0].size), np.zeros(x[0].size), {})
    np.testing.assert_allclose(out_g1, out_ln.reshape(x.shape), rtol=1e-12, atol=1e-12)
    out_gc, _ = R.spatial_groupnorm_forward(x, gamma, beta, C, {})
    out_in, _ = R.instancenorm_forward(x, gamma, beta, {})
    np.testing.assert_allclose(out_gc, out_in, rtol=1e-12, atol=1e-12)


def test_layernorm_normalizes_each_row():
    x = rng(16).standard_normal((6, 10)) * 4 + 7
    out, _ = R.layernorm_forward(x, np.ones(10), np.zeros(10), {"eps": 1e-12})
    np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=1), 1.0, rtol=1e-9)


def test_rmsnorm_gives_unit_root_mean_square():
    x = rng(17).standard_normal((6, 10)) * 4 + 7
    out, _ = R.rmsnorm_forward(x, np.ones(10), {})
    np.testing.assert_allclose(np.sqrt(np.mean(out ** 2, axis=1)), 1.0, rtol=1e-12)
    assert np.all(np.abs(out.mean(axis=1)) > 0.5)  # not centered


def test_gradients_of_cs231n_shaped_params_keep_their_shape():
    _, x, gamma, beta, _ = channel_case(18)
    g4, b4 = gamma.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1)
    out, cache = R.spatial_groupnorm_forward(x, g4, b4, 2, {})
    _, dgamma, dbeta = R.spatial_groupnorm_backward(np.ones_like(out), cache)
    assert dgamma.shape == dbeta.shape == (1, 4, 1, 1)
    out, cache = R.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    _, dgamma, dbeta = R.spatial_batchnorm_backward(np.ones_like(out), cache)
    assert dgamma.shape == dbeta.shape == (4,)


def test_float32_inputs_keep_their_dtype():
    x = rng(19).standard_normal((4, 3, 5)).astype(np.float32)
    p = {"mode": "train"}
    out, _ = R.spatial_batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), p)
    assert out.dtype == np.float32 and p["running_var"].dtype == np.float32


# ----------------------------------------------------------------------------- the gradient checker itself

def test_eval_numerical_gradient_of_a_known_function_and_restores_x():
    x = rng(20).standard_normal((3, 4))
    x0 = x.copy()
    grad = R.eval_numerical_gradient(lambda v: np.sum(v ** 3), x)
    np.testing.assert_allclose(grad, 3 * x0 ** 2, rtol=1e-8, atol=1e-9)  # truncation error h^2 = 1e-10
    np.testing.assert_array_equal(x, x0)


def test_eval_numerical_gradient_verbose_prints_each_index(capsys):
    R.eval_numerical_gradient(lambda v: float(np.sum(v)), np.zeros(2), verbose=True)
    assert capsys.readouterr().out.count("\n") == 2


def test_eval_numerical_gradient_array_is_a_vector_jacobian_product():
    g = rng(21)
    A, x, df = g.standard_normal((5, 3)), g.standard_normal(3), g.standard_normal(5)
    np.testing.assert_allclose(R.eval_numerical_gradient_array(lambda v: A @ v, x, df), A.T @ df, rtol=1e-8)


def test_rel_error_semantics():
    assert R.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert R.rel_error(np.array([1.0]), np.array([3.0])) == pytest.approx(0.5)
    assert R.rel_error(np.array([0.0]), np.array([1e-10])) == pytest.approx(1e-2)  # 1e-8 floor
    with pytest.raises(ValueError, match="same shape"):
        R.rel_error(np.zeros(2), np.zeros(3))


def test_check_layer_catches_a_wrong_backward():
    def wrong_backward(dout, cache):
        dx, dgamma, dbeta = R.batchnorm_backward(dout, cache)
        return dout * cache.gamma / cache.std, dgamma, dbeta   # ignores the paths through mu and var

    x = rng(22).standard_normal((5, 3))
    errors = R.check_layer(R.batchnorm_forward, wrong_backward, (x, np.ones(3), np.zeros(3)), {"mode": "train"})
    assert errors["x"] > 1e-3 and errors["gamma"] < TOL


def test_check_layer_does_not_advance_running_statistics_or_touch_inputs():
    x = rng(23).standard_normal((5, 3))
    x0 = x.copy()
    p = {"mode": "train"}
    R.check_layer(R.batchnorm_forward, R.batchnorm_backward, {"x": x, "g": np.ones(3), "b": np.zeros(3)}, p)
    assert "running_mean" not in p
    np.testing.assert_array_equal(x, x0)


def test_check_layer_needs_one_gradient_per_input():
    x = rng(24).standard_normal((5, 3))
    with pytest.raises(ValueError, match="3 inputs"):
        R.check_layer(R.batchnorm_forward, lambda d, c: R.batchnorm_backward(d, c)[:2],
                      (x, np.ones(3), np.zeros(3)), {"mode": "train"})


# ----------------------------------------------------------------------------- bad input

X2 = np.zeros((4, 3)) + np.arange(3.0)
X4 = rng(25).standard_normal((2, 4, 3, 3))
ONE3, ZERO3, ONE4, ZERO4 = np.ones(3), np.zeros(3), np.ones(4), np.zeros(4)

BAD_CALLS = [
    ("3-D x to batchnorm", lambda: R.batchnorm_forward(X4[0], ONE3, ZERO3, {"mode": "train"}),
     ValueError, r"batchnorm_forward: x must be 2-D \(N, D\)"),
    ("gamma of wrong length", lambda: R.batchnorm_forward(X2, ONE4, ZERO3, {"mode": "train"}),
     ValueError, r"gamma must have shape \(3,\)"),
    ("beta unlike gamma", lambda: R.batchnorm_forward(X2, ONE3, ZERO3[None], {"mode": "train"}),
     ValueError, "beta must have the shape of gamma"),
    ("missing mode", lambda: R.batchnorm_forward(X2, ONE3, ZERO3, {}), ValueError, "mode'] is required"),
    ("bad mode", lambda: R.batchnorm_forward(X2, ONE3, ZERO3, {"mode": "eval"}),
     ValueError, "'train' or 'test', got 'eval'"),
    ("bad momentum", lambda: R.batchnorm_forward(X2, ONE3, ZERO3, {"mode": "train", "momentum": 1.5}),
     ValueError, "momentum"),
    ("bad eps", lambda: R.layernorm_forward(X2, ONE3, ZERO3, {"eps": -1.0}), ValueError, "eps"),
    ("bad unbiased flag", lambda: R.batchnorm_forward(X2, ONE3, ZERO3, {"mode": "train", "unbiased": "yes"}),
     ValueError, "unbiased"),
    ("running mean of wrong shape",
     lambda: R.batchnorm_forward(X2, ONE3, ZERO3, {"mode": "test", "running_mean": np.zeros(4)}),
     ValueError, r"running_mean'\] must have shape \(3,\)"),
    ("one row in training", lambda: R.batchnorm_forward(X2[:1], ONE3, ZERO3, {"mode": "train"}),
     ValueError, "more than one value per channel"),
    ("integer x", lambda: R.batchnorm_forward(X2.astype(int), ONE3, ZERO3, {"mode": "train"}),
     TypeError, "floating dtype"),
    ("param not a dict", lambda: R.batchnorm_forward(X2, ONE3, ZERO3, "train"), TypeError, "must be a dict"),
    ("2-D x to spatial batchnorm", lambda: R.spatial_batchnorm_forward(X2, ONE3, ZERO3, {"mode": "train"}),
     ValueError, "spatial_batchnorm_forward: x must have at least 3 dimensions"),
    ("spatial batchnorm bad mode", lambda: R.spatial_batchnorm_forward(X4, ONE4, ZERO4, {"mode": "x"}),
     ValueError, "spatial_batchnorm_forward: bn_param"),
    ("layernorm shape mismatch", lambda: R.layernorm_forward(X2, ONE4, ZERO4, {}),
     ValueError, "trailing dimensions of x must equal gamma.shape"),
    ("G not dividing C", lambda: R.spatial_groupnorm_forward(X4, ONE4, ZERO4, 3, {}),
     ValueError, "G=3 groups must divide the 4 channels"),
    ("G zero", lambda: R.spatial_groupnorm_forward(X4, ONE4, ZERO4, 0, {}), ValueError, "positive integer"),
    ("groupnorm gamma shape", lambda: R.spatial_groupnorm_forward(X4, ONE3, ZERO3, 2, {}),
     ValueError, r"gamma must have shape \(4,\) or \(1, 4, 1, 1\)"),
    ("instance of one position", lambda: R.instancenorm_forward(X4[:, :, :1, :1], ONE4, ZERO4, {}),
     ValueError, "more than one spatial position"),
    ("rmsnorm shape mismatch", lambda: R.rmsnorm_forward(X2, ONE4, {}), ValueError, "normalized shape"),
    ("r_max below 1", lambda: R.batchrenorm_forward(X4, ONE4, ZERO4, {"mode": "train", "r_max": 0.5}),
     ValueError, "r_max"),
    ("negative d_max", lambda: R.batchrenorm_forward(X4, ONE4, ZERO4, {"mode": "train", "d_max": -1}),
     ValueError, "d_max"),
    ("rho out of range",
     lambda: R.batchinstancenorm_forward(X4, ONE4, ZERO4, np.full(4, 1.5), {"mode": "train"}),
     ValueError, r"rho must lie in \[0, 1\]"),
    ("switch logits shape",
     lambda: R.switchnorm_forward(X4, ONE4, ZERO4, np.zeros(2), np.zeros(3), {"mode": "train"}),
     ValueError, r"mean_weight must have shape \(3,\)"),
]


@pytest.mark.parametrize("label,call,exc,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_with_a_clear_message(label, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backward_checks_dout_and_cache():
    out, cache = R.layernorm_forward(X2, ONE3, ZERO3, {})
    with pytest.raises(ValueError, match=r"layernorm_backward: dout must have the forward output's shape"):
        R.layernorm_backward(np.ones((4, 4)), cache)
    _, bn_cache = R.batchnorm_forward(X2, ONE3, ZERO3, {"mode": "test"})
    with pytest.raises(TypeError, match="LayerNormCache"):
        R.layernorm_backward(np.ones_like(out), bn_cache)


# ----------------------------------------------------------------------------- packaging

def test_importing_the_reference_does_not_import_torch():
    code = "import normzoo.reference, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_everything_public_is_exported():
    for name in R.__all__:
        assert hasattr(R, name), name
    for stem in ("batchnorm", "spatial_batchnorm", "layernorm", "instancenorm", "spatial_groupnorm", "rmsnorm",
                 "batchrenorm", "batchinstancenorm", "switchnorm"):
        assert f"{stem}_forward" in R.__all__ and f"{stem}_backward" in R.__all__
