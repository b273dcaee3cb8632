"""Spectral normalization: torch parity (weights and gradients), convergence, buffers, GAN usage, errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as tp

from normzoo.nn.spectral import SpectralNorm, is_spectral_normed, remove_spectral_norm, spectral_norm, spectral_sigma

torch.set_num_threads(1)

LAYERS = [
    (lambda: nn.Linear(7, 5), (3, 7)),
    (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5)),  # dim=1 by default
]


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_matches_torch_spectral_norm_given_the_same_vectors(make, shape, n_iter):
    torch.manual_seed(0)
    ours = spectral_norm(make(), n_power_iterations=n_iter)
    ref = tp.spectral_norm(make(), n_power_iterations=n_iter)
    ours.load_state_dict(ref.state_dict())  # same weight, bias, u and v
    for step in range(3):
        x = torch.randn(shape)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        for a, b in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
        torch.testing.assert_close(ours.parametrizations.weight[0]._u, ref.parametrizations.weight[0]._u)
        torch.testing.assert_close(ours.parametrizations.weight[0]._v, ref.parametrizations.weight[0]._v)
        with torch.no_grad():  # a training step, so that the next iteration sees a new weight
            for a, b in zip(ours.parameters(), ref.parameters()):
                a -= 0.1 * a.grad
                b -= 0.1 * b.grad
                a.grad = b.grad = None


def test_state_dict_keys_and_buffers_as_torch():
    lin = spectral_norm(nn.Linear(6, 4))
    keys = set(lin.state_dict())
    assert keys == {"bias", "parametrizations.weight.original", "parametrizations.weight.0._u",
                    "parametrizations.weight.0._v"}
    sn = lin.parametrizations.weight[0]
    assert sn._u.shape == (4,) and sn._v.shape == (6,)
    assert set(dict(lin.named_buffers())) == {"parametrizations.weight.0._u", "parametrizations.weight.0._v"}


def test_conv_transpose_uses_dim_1():
    conv = spectral_norm(nn.ConvTranspose2d(3, 5, 3))
    sn = conv.parametrizations.weight[0]
    assert sn.dim == 1 and sn._u.shape == (5,) and sn._v.shape == (3 * 9,)


@pytest.mark.parametrize("make", [lambda: nn.Linear(20, 30), lambda: nn.Conv2d(4, 8, 3)])
def test_normalized_weight_has_unit_spectral_norm_after_enough_iterations(make):
    torch.manual_seed(1)
    m = spectral_norm(make(), n_power_iterations=5)
    for _ in range(20):
        w = m.weight  # training mode: each access runs the iterations
    mat = w.detach().flatten(1)
    assert torch.linalg.matrix_norm(mat, 2).item() == pytest.approx(1.0, abs=1e-3)
    exact = torch.linalg.matrix_norm(m.parametrizations.weight.original.detach().flatten(1), 2)
    assert spectral_sigma(m).item() == pytest.approx(exact.item(), rel=1e-3)


def test_eval_runs_no_iteration_and_training_does():
    torch.manual_seed(2)
    m = spectral_norm(nn.Linear(5, 5))
    sn = m.parametrizations.weight[0]
    u0 = sn._u.clone()
    m.eval()
    w_eval = m.weight.detach().clone()
    m(torch.randn(2, 5))
    assert torch.equal(sn._u, u0)
    torch.testing.assert_close(m.weight, w_eval)
    with torch.no_grad():
        m.parametrizations.weight.original.add_(torch.randn(5, 5))
    m.train()
    m(torch.randn(2, 5))
    assert not torch.equal(sn._u, u0)


def test_two_forwards_before_one_backward():
    torch.manual_seed(3)
    disc = nn.Sequential(spectral_norm(nn.Linear(4, 8)), nn.LeakyReLU(0.2), spectral_norm(nn.Linear(8, 1)))
    real, fake = torch.randn(6, 4), torch.randn(6, 4, requires_grad=True)
    loss = disc(real).mean() - disc(fake).mean()
    loss.backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all()
    for p in disc.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_loads_the_old_hook_based_state_dict():
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.nn.utils.spectral_norm(nn.Conv2d(2, 3, 3))
    old(torch.randn(1, 2, 5, 5))  # a few iterations, so u and v differ from ours
    sd = old.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(sd)
    ours = spectral_norm(nn.Conv2d(2, 3, 3))
    ours.load_state_dict(sd)
    old.eval()
    ours.eval()
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(ours(x), old(x))


def test_sigma_and_remove():
    torch.manual_seed(5)
    m = spectral_norm(nn.Conv2d(3, 4, 3))
    sn = m.parametrizations.weight[0]
    W = m.parametrizations.weight.original.detach()
    expected = torch.dot(sn._u, W.flatten(1) @ sn._v)
    torch.testing.assert_close(spectral_sigma(m), expected)
    ref = tp.spectral_norm(nn.Conv2d(3, 4, 3))
    torch.testing.assert_close(spectral_sigma(ref), ref.parametrizations.weight[0]._u @ (
        ref.parametrizations.weight.original.detach().flatten(1) @ ref.parametrizations.weight[0]._v))
    m.eval()
    w_eval = m.weight.detach().clone()
    m.train()
    u_before = sn._u.clone()
    remove_spectral_norm(m)
    assert torch.equal(sn._u, u_before)  # no extra iteration on removal
    assert isinstance(m.weight, nn.Parameter) and not is_spectral_normed(m)
    torch.testing.assert_close(m.weight.detach(), w_eval)


def test_one_dimensional_weight_is_divided_by_its_norm():
    mod = nn.Module()
    mod.weight = nn.Parameter(torch.tensor([3.0, 4.0]))
    spectral_norm(mod)
    torch.testing.assert_close(mod.weight, torch.tensor([0.6, 0.8]))
    assert spectral_sigma(mod).item() == pytest.approx(5.0)


def test_gradcheck_float64():
    torch.manual_seed(6)
    w = torch.randn(4, 3, 2, dtype=torch.float64)
    sn = SpectralNorm(w, n_power_iterations=1).eval()  # eval: a fixed function of W for given u, v
    assert torch.autograd.gradcheck(sn, (w.clone().requires_grad_(),))


def test_errors():
    with pytest.raises(ValueError, match="n_power_iterations"):
        spectral_norm(nn.Linear(3, 3), n_power_iterations=0)
    with pytest.raises(ValueError, match="eps"):
        spectral_norm(nn.Linear(3, 3), eps=0.0)
    with pytest.raises(ValueError, match="no parameter"):
        spectral_norm(nn.Linear(3, 3), name="kernel")
    with pytest.raises(ValueError, match="dim"):
        spectral_norm(nn.Linear(3, 3), dim=2)
    with pytest.raises(ValueError, match="already"):
        spectral_norm(spectral_norm(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="not spectrally"):
        spectral_sigma(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not spectrally"):
        remove_spectral_norm(nn.Linear(3, 3))
