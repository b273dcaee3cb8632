"""Weight normalization: torch parity, checkpoints both ways, removal, data-dependent init, errors."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as tp

from normzoo.nn.weight import data_dependent_init, is_weight_normed, remove_weight_norm, weight_norm

torch.set_num_threads(1)


def _pair(make, dim):
    torch.manual_seed(0)
    ours = weight_norm(make(), dim=dim)
    ref = tp.weight_norm(make(), dim=dim)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


LAYERS = [
    (lambda: nn.Linear(7, 5), (3, 7)),
    (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    (lambda: nn.ConvTranspose1d(3, 4, 3), (2, 3, 5)),
]


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("dim", [0, 1, -2, None, -1])
def test_matches_torch_weight_norm(make, shape, dim):
    ours, ref = _pair(make, dim)
    g, g_ref = ours.parametrizations.weight.original0, ref.parametrizations.weight.original0
    assert g.shape == g_ref.shape
    assert ours.parametrizations.weight.original1.shape == ref.parametrizations.weight.original1.shape
    x = torch.randn(shape)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_registration_keeps_the_weight_and_uses_torch_keys():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    w = lin.weight.detach().clone()
    weight_norm(lin)
    torch.testing.assert_close(lin.weight, w)
    assert set(lin.state_dict()) == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    torch.testing.assert_close(lin.parametrizations.weight.original0.squeeze(1), w.norm(dim=1))


def test_checkpoints_load_both_ways_with_torch():
    torch.manual_seed(1)
    ours = weight_norm(nn.Conv2d(3, 5, 3))
    ref = tp.weight_norm(nn.Conv2d(3, 5, 3))
    x = torch.randn(2, 3, 7, 7)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ref(x), ours(x))
    with torch.no_grad():
        ref.parametrizations.weight.original0.mul_(2.0)
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours(x), ref(x))


def test_loads_old_style_weight_g_weight_v_state_dict():
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old API is deprecated
        old = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    sd = old.state_dict()
    assert {"weight_g", "weight_v"} <= set(sd)
    ours = weight_norm(nn.Linear(4, 3))
    ours.load_state_dict(sd)
    x = torch.randn(5, 4)
    torch.testing.assert_close(ours(x), old(x))


def test_refuses_a_module_with_the_old_hook():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="remove_weight_norm"):
        weight_norm(old)


@pytest.mark.parametrize("which", ["normzoo", "torch"])
def test_remove_restores_a_plain_weight_with_the_same_values(which):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3)
    (weight_norm if which == "normzoo" else tp.weight_norm)(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(1.7)
    w = conv.weight.detach().clone()
    remove_weight_norm(conv)
    assert isinstance(conv.weight, nn.Parameter) and not is_weight_normed(conv)
    assert not hasattr(conv, "parametrizations")
    torch.testing.assert_close(conv.weight.detach(), w)
    assert set(conv.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("dim", [0, None])
def test_gradcheck_float64(dim):
    torch.manual_seed(4)
    lin = weight_norm(nn.Linear(4, 3).double(), dim=dim)
    g = lin.parametrizations.weight.original0.detach().clone().requires_grad_()
    v = lin.parametrizations.weight.original1.detach().clone().requires_grad_()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    wn = lin.parametrizations.weight[0]
    assert torch.autograd.gradcheck(lambda g, v, x: x @ wn(g, v).T, (g, v, x))


def test_zero_weight_gives_zero_not_nan():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
    weight_norm(lin)
    assert torch.equal(lin.weight, torch.zeros(2, 3))
    lin.weight.sum().backward()
    assert torch.isfinite(lin.parametrizations.weight.original1.grad).all()


def test_works_with_parametrize_cached():
    from torch.nn.utils import parametrize

    torch.manual_seed(8)
    lin = weight_norm(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    expected = lin(x) + lin(x)
    with parametrize.cached():
        out = lin(x) + lin(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert lin.parametrizations.weight.original0.grad is not None


def test_errors():
    with pytest.raises(ValueError, match="no parameter"):
        weight_norm(nn.Linear(2, 2), name="kernel")
    with pytest.raises(ValueError, match="dim"):
        weight_norm(nn.Linear(2, 2), dim=2)
    with pytest.raises(ValueError, match="already"):
        weight_norm(weight_norm(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        weight_norm(torch.zeros(2, 2))  # type: ignore[arg-type]
    emb = nn.Embedding(4, 3)
    emb.weight = nn.Parameter(torch.zeros(4, 3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="floating"):
        weight_norm(emb)
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(nn.Linear(2, 2))


# -- data-dependent initialization ---------------------------------------------------------------------


def _stats(t: torch.Tensor, axis: int):
    dims = [d for d in range(t.dim()) if d != axis]
    return t.mean(dims), t.var(dims, unbiased=False)


def _net():
    return nn.Sequential(
        weight_norm(nn.Conv2d(3, 6, 3)),
        nn.ReLU(),
        weight_norm(nn.ConvTranspose2d(6, 4, 3), dim=1),
        nn.ReLU(),
        nn.Flatten(),
        weight_norm(nn.Linear(4 * 8 * 8, 5)),
    )


@pytest.mark.parametrize("init_scale", [1.0, 0.5])
def test_data_dependent_init_standardizes_every_pre_activation(init_scale):
    torch.manual_seed(5)
    net = _net()
    x = torch.randn(32, 3, 8, 8) * 4.0 + 3.0
    seen = {}
    for i in (0, 2, 5):
        net[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach()))
    data_dependent_init(net, x, init_scale=init_scale)
    seen.clear()
    net(x)  # the initialized network, seen through ordinary hooks
    for i, axis in ((0, 1), (2, 1), (5, 1)):
        mean, var = _stats(seen[i], axis)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
        torch.testing.assert_close(var, torch.full_like(var, init_scale**2), atol=1e-3, rtol=1e-3)


def test_data_dependent_init_matches_the_paper_formula():
    torch.manual_seed(6)
    lin = weight_norm(nn.Linear(5, 3))
    x = torch.randn(64, 5)
    v = lin.parametrizations.weight.original1.detach().clone()
    t = x @ (v / v.norm(dim=1, keepdim=True)).T
    mu, sigma = t.mean(0), t.var(0, unbiased=False).add(1e-8).sqrt()
    data_dependent_init(lin, x, init_scale=2.0)
    torch.testing.assert_close(lin.parametrizations.weight.original0.squeeze(1), 2.0 / sigma)
    torch.testing.assert_close(lin.bias.detach(), -mu * 2.0 / sigma)
    torch.testing.assert_close(lin.parametrizations.weight.original1, v)  # the direction is kept


def test_data_dependent_init_batch_forms_and_no_bias():
    torch.manual_seed(7)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = weight_norm(nn.Linear(4, 3, bias=False))

        def forward(self, a, b):
            return self.lin(a + b)

    a, b = torch.randn(40, 4) + 5.0, torch.randn(40, 4)
    for batch in ((a, b), {"a": a, "b": b}):
        m = Two()
        data_dependent_init(m, batch)
        _, var = _stats(m(a, b), 1)
        torch.testing.assert_close(var, torch.ones(3), atol=1e-4, rtol=1e-4)  # scale only: no bias to centre


def test_data_dependent_init_constant_feature_warns_without_nan():
    lin = weight_norm(nn.Linear(3, 2))
    x = torch.randn(16, 3)
    x[:, 0] = 1.0
    with torch.no_grad():
        lin.parametrizations.weight.original1.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.3, 1.0, -0.5]]))
    with pytest.warns(RuntimeWarning, match="constant"):
        data_dependent_init(lin, x)
    out = lin(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 0], torch.zeros(16), atol=1e-6, rtol=0)
    assert lin.parametrizations.weight.original0[0, 0].item() == pytest.approx(1.0)


def test_data_dependent_init_keeps_mode_and_warns_about_unused_modules():
    net = nn.ModuleDict({"used": weight_norm(nn.Linear(3, 3)), "unused": weight_norm(nn.Linear(3, 3))})
    net.eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net["used"](x)

    model = Wrap().eval()
    with pytest.warns(RuntimeWarning, match="unused"):
        data_dependent_init(model, torch.randn(10, 3))
    assert not model.training


def test_data_dependent_init_errors():
    with pytest.raises(ValueError, match="no weight-normalized"):
        data_dependent_init(nn.Linear(3, 2), torch.randn(4, 3))
    whole = weight_norm(nn.Linear(3, 2), dim=None)
    before = {k: v.clone() for k, v in whole.state_dict().items()}
    with pytest.raises(ValueError, match="per output feature"):
        data_dependent_init(whole, torch.randn(4, 3))
    for k, v in whole.state_dict().items():  # nothing changed by the failed call
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="groups"):
        data_dependent_init(weight_norm(nn.ConvTranspose1d(4, 4, 3, groups=2), dim=1), torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="supports"):
        data_dependent_init(weight_norm(nn.Embedding(5, 3)), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="eps"):
        data_dependent_init(weight_norm(nn.Linear(3, 2)), torch.randn(4, 3), eps=0.0)
    with pytest.raises(ValueError, match="more than one"):
        data_dependent_init(weight_norm(nn.Linear(3, 2)), torch.randn(1, 3))
    with pytest.raises(TypeError, match="batch"):
        data_dependent_init(weight_norm(nn.Linear(3, 2)), 3.0)
