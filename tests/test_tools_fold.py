"""fold: same outputs, no norm left where it folded, refusals and the cases that must not fold."""
import copy
import warnings

import pytest
import torch
from torch import nn

import normzoo
import normzoo.nn as znn
from normzoo.tools import find_fold_pairs, fold

TOL = dict(rtol=1e-4, atol=1e-5)


def _trained(norm, gen):
    c = norm.running_mean.numel()
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
            norm.bias.copy_(torch.randn(c, generator=gen))
        norm.running_mean.copy_(torch.randn(c, generator=gen))
        norm.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)
    return norm.eval()


LAYERS = [  # (layer, input shape, BN class for its output)
    (lambda: nn.Conv1d(4, 6, 3, bias=False), (2, 4, 9), nn.BatchNorm1d),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), (2, 4, 7, 7), nn.BatchNorm2d),
    (lambda: nn.Conv2d(6, 6, 3, groups=6, bias=False, padding=1, padding_mode="reflect"), (2, 6, 5, 5),
     nn.BatchNorm2d),
    (lambda: nn.Conv3d(2, 4, 2), (2, 2, 3, 4, 3), nn.BatchNorm3d),
    (lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), (2, 4, 5), nn.BatchNorm1d),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 4, 4), nn.BatchNorm2d),
    (lambda: nn.ConvTranspose3d(3, 4, 2), (1, 3, 2, 3, 2), nn.BatchNorm3d),
    (lambda: nn.Linear(5, 6), (4, 5), nn.BatchNorm1d),
    (lambda: nn.Linear(5, 6, bias=False), (4, 5), nn.BatchNorm1d),
]


def _norm_makers(bn_cls):
    dim = bn_cls.__name__[-2:]
    yield lambda c: bn_cls(c)
    yield lambda c: bn_cls(c, affine=False)
    yield lambda c: getattr(znn, f"BatchNorm{dim}")(c)
    yield lambda c: getattr(znn, f"MeanOnlyBatchNorm{dim}")(c)
    yield lambda c: znn.SyncBatchNorm(c)
    for name in (f"brn{dim}", f"cbn{dim}"):
        if name in normzoo.available():
            yield lambda c, name=name: normzoo.create(name, c)


@pytest.mark.parametrize("make_layer,shape,bn_cls", LAYERS)
def test_fold_gives_the_same_outputs(make_layer, shape, bn_cls):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for make_norm in _norm_makers(bn_cls):
        layer = make_layer()
        c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        model = nn.Sequential(layer, _trained(make_norm(c), gen), nn.ReLU()).eval()
        x = torch.randn(shape, generator=gen)
        expected = model(x)
        folded = fold(model)
        assert folded is model and isinstance(model[1], nn.Identity), type(model[1])
        assert model[0].bias is not None
        torch.testing.assert_close(model(x), expected, **TOL)


def test_fold_keeps_channels_last_weights_and_does_not_touch_the_original_when_asked():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _trained(nn.BatchNorm2d(8), gen)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    folded = fold(model, inplace=False)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(folded[1], nn.Identity)
    assert folded[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(folded(x), expected, **TOL)


class Block(nn.Module):
    """A traceable residual block: conv1 -> bn1 folds; conv2's output also feeds the skip sum, so it must not."""

    def __init__(self, gen):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = _trained(nn.BatchNorm2d(4), gen)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = _trained(nn.BatchNorm2d(4), gen)
        self.shared = nn.Conv2d(4, 4, 1)  # called twice: not folded
        self.bn3 = _trained(nn.BatchNorm2d(4), gen)
        self.bn4 = _trained(nn.BatchNorm2d(4), gen)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        out = self.bn2(z) + z
        return self.bn3(self.shared(out)) + self.bn4(self.shared(x))


def test_fold_nested_traceable_model_respects_other_uses():
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(Block(gen), Block(gen)).eval()
    x = torch.randn(2, 4, 5, 5, generator=gen)
    expected = model(x)
    assert find_fold_pairs(model, "fx") == [("0.conv1", "0.bn1"), ("1.conv1", "1.bn1")]
    fold(model)
    for block in model:
        assert isinstance(block.bn1, nn.Identity)
        assert all(isinstance(b, nn.BatchNorm2d) for b in (block.bn2, block.bn3, block.bn4))
    torch.testing.assert_close(model(x), expected, **TOL)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the Sequential inside is still folded."""

    def __init__(self, gen):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), _trained(nn.BatchNorm2d(4), gen), nn.ReLU(),
                                  nn.Conv2d(4, 4, 1), _trained(znn.BatchNorm2d(4), gen))
        self.alt = nn.Sequential(nn.Conv2d(3, 4, 3), _trained(nn.BatchNorm2d(4), gen))

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(x) + self.alt(x)


def test_fold_falls_back_to_sequential_adjacency():
    gen = torch.Generator().manual_seed(3)
    model = Untraceable(gen).eval()
    with pytest.raises(torch.fx.proxy.TraceError):
        find_fold_pairs(model, "fx")
    x = torch.randn(2, 3, 6, 6, generator=gen)
    expected = (model(x), model(-x.abs()))
    fold(model)
    assert isinstance(model.body[1], nn.Identity) and isinstance(model.body[4], nn.Identity)
    assert isinstance(model.alt[1], nn.Identity)
    torch.testing.assert_close(model(x), expected[0], **TOL)
    torch.testing.assert_close(model(-x.abs()), expected[1], **TOL)


def test_fold_bakes_a_weight_norm_parametrization():
    gen = torch.Generator().manual_seed(4)
    conv = znn.weight_norm(nn.Conv2d(3, 4, 3))
    model = nn.Sequential(conv, _trained(nn.BatchNorm2d(4), gen)).eval()
    x = torch.randn(2, 3, 5, 5, generator=gen)
    expected = model(x)
    fold(model)
    assert isinstance(model[1], nn.Identity) and type(model[0]) is nn.Conv2d
    torch.testing.assert_close(model(x), expected, **TOL)


def test_fold_refuses_training_mode_and_missing_statistics_naming_the_layer():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _trained(nn.BatchNorm2d(4), gen), nn.Conv2d(4, 4, 1),
                          _trained(nn.BatchNorm2d(4), gen))
    model[3].train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"BatchNorm2d at '3' is in training mode"):
        fold(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing folded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"BatchNorm2d at '1' has no running statistics"):
        fold(model)


def test_fold_leaves_look_alikes_with_a_warning():
    """A layer with running statistics whose eval output mixes per-sample statistics is not an affine map."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    for name in ("switch2d", "bin2d"):
        if name not in normzoo.available():
            continue
        norm = normzoo.create(name, 4)
        with torch.no_grad():
            for p in norm.parameters():
                p.uniform_(0.2, 0.8)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), _trained(norm, gen)).eval()
        expected = model(x)
        with pytest.warns(UserWarning, match="not an affine map"):
            fold(model)
        assert model[1] is norm
        torch.testing.assert_close(model(x), expected)


def test_fold_ignores_other_norms_and_instance_norm_without_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold(model)
    assert type(model[1]) is nn.GroupNorm and type(model[3]) is nn.InstanceNorm2d


def test_fold_instance_norm_with_running_statistics_in_eval():
    gen = torch.Generator().manual_seed(7)
    norm = _trained(nn.InstanceNorm2d(4, affine=True, track_running_stats=True), gen)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm).eval()
    x = torch.randn(2, 3, 5, 5, generator=gen)
    expected = model(x)
    fold(model)
    assert isinstance(model[1], nn.Identity)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_fold_method_argument():
    with pytest.raises(ValueError, match="method"):
        find_fold_pairs(nn.Sequential(), "magic")
    with pytest.raises(TypeError, match="nn.Module"):
        fold(object())
