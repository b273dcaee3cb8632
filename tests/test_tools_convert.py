"""convert / to_torch / to_normzoo: every layer found, state carried where it means the same, nothing else touched."""
import copy

import pytest
import torch
from torch import nn

import normzoo
import normzoo.nn as znn
from normzoo.tools import convert, freeze, is_frozen, keeps_batch_stats, to_normzoo, to_torch, unfreeze


def _trained(bn, gen, steps=2):
    """Random affine parameters and non-trivial running statistics."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
            bn.num_batches_tracked.fill_(steps)
    return bn


class Nested(nn.Module):
    """Norm layers reached by attribute, in Sequential, ModuleList and ModuleDict, and one shared by two parents."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _trained(nn.BatchNorm2d(8), gen)
        shared = _trained(nn.BatchNorm2d(8), gen)
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 1), shared, nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1), shared)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 6)),
                                    "b": _trained(nn.BatchNorm1d(6), gen)})

    def forward(self, x):
        x = self.seq(torch.relu(self.bn(self.conv(x))))
        x = self.blocks[0](x)
        return self.heads["b"](self.heads["a"](x))


def _norms(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm,
                                                                       znn.GroupNorm, znn.InstanceNorm1d))]


def test_convert_reaches_every_container_keeps_sharing_and_carries_affine():
    model = Nested()
    before = copy.deepcopy(model)
    out = convert(model, "gn", groups=2)
    assert out is model
    gns = [m for m in model.modules() if isinstance(m, znn.GroupNorm)]
    assert len(gns) == 3 and all(g.num_groups == 2 for g in gns)  # bn, the shared one (once), heads.b
    assert model.seq[1] is model.blocks[0][1]  # still one shared layer
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.heads["b"], znn.GroupNorm) and model.heads["b"].num_channels == 6
    for new, old in ((model.bn, before.bn), (model.seq[1], before.seq[1]), (model.heads["b"], before.heads["b"])):
        assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)
        assert new.eps == old.eps
    model(torch.randn(2, 3, 4, 4))  # runs


def test_convert_keeps_device_dtype_mode_requires_grad_and_channels_last():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _trained(nn.BatchNorm2d(4), gen), nn.Conv2d(4, 4, 1),
                          _trained(nn.BatchNorm2d(4), gen)).double()
    model = model.to(memory_format=torch.channels_last)
    model[1].eval()
    model[3].weight.requires_grad_(False)
    convert(model, "bn2d")
    assert type(model[1]) is znn.BatchNorm2d and type(model[3]) is znn.BatchNorm2d
    assert model[1].weight.dtype == torch.float64 and model[1].running_mean.dtype == torch.float64
    assert not model[1].training and model[3].training
    assert not model[3].weight.requires_grad and model[3].bias.requires_grad
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert model(x).is_contiguous(memory_format=torch.channels_last)


def test_convert_batch_family_carries_running_statistics_and_options():
    gen = torch.Generator().manual_seed(2)
    bn = _trained(nn.BatchNorm2d(5, eps=1e-3, momentum=0.01), gen)
    model = nn.Sequential(bn).eval()
    x = torch.randn(3, 5, 4, 4)
    expected = model(x)
    for name in ("bn2d", "syncbn", "brn2d", "cbn2d", "mbn2d"):
        if name not in normzoo.available():
            continue
        new = convert(copy.deepcopy(model), name)[0]
        assert keeps_batch_stats(new), name
        assert new.eps == 1e-3 and new.momentum == 0.01, name
        assert torch.equal(new.running_mean, bn.running_mean) and torch.equal(new.running_var, bn.running_var)
        assert int(new.num_batches_tracked) == 2
        if name != "mbn2d":  # in eval these are BatchNorm with the running statistics
            torch.testing.assert_close(convert(copy.deepcopy(model), name)(x), expected, rtol=1e-5, atol=1e-5)


def test_convert_to_every_registered_channel_first_method():
    """Each registered channel-first target replaces BN and carries weight/bias (and BN statistics if it keeps them)."""
    gen = torch.Generator().manual_seed(3)
    for name in normzoo.available():
        try:
            probe = normzoo.create(name, 4)
        except TypeError:
            continue
        if hasattr(probe, "normalized_shape"):
            continue  # last-dims layers: see the layout test
        model = nn.Sequential(_trained(nn.BatchNorm2d(4), gen))
        old = model[0]
        convert(model, name)
        new = model[0]
        assert new is not old and not isinstance(new, nn.BatchNorm2d), name
        if getattr(new, "weight", None) is not None and new.weight.shape == old.weight.shape:
            assert torch.equal(new.weight, old.weight), name
        if keeps_batch_stats(new) and getattr(new, "running_mean", None) is not None:
            assert torch.equal(new.running_mean, old.running_mean), name
        elif getattr(new, "running_mean", None) is not None:  # e.g. InstanceNorm: a different quantity
            assert not torch.equal(new.running_mean, old.running_mean), name


def test_dimension_family():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.GroupNorm(2, 4))
    convert(model, "in2d")
    assert [type(m) for m in model] == [znn.InstanceNorm1d, znn.InstanceNorm2d, znn.InstanceNorm3d,
                                        znn.InstanceNorm2d]
    if "brn1d" in normzoo.available():
        model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4))
        convert(model, "brn2d")
        assert [type(m).__name__ for m in model] == ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]
    if "frn1d" in normzoo.available():  # "frn" is the 2d member's name; its alias "frn2d" names the family
        model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm2d(4))
        convert(model, "frn")
        assert [type(m).__name__ for m in model] == ["FilterResponseNorm1d", "FilterResponseNorm2d"]
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm3d(4))
    convert(model, "gn", groups=4)  # dimension-free: the same method everywhere
    assert all(type(m) is znn.GroupNorm for m in model)


def test_layout_rule_and_explicit_source():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(16))
    convert(model, "gn", groups=2)
    assert type(model[0]) is znn.GroupNorm and type(model[2]) is nn.LayerNorm  # LayerNorm left alone
    convert(model, "rms")
    assert type(model[2]) is znn.RMSNorm and model[2].normalized_shape == (16,) and type(model[0]) is znn.GroupNorm
    assert model[2].eps == 1e-5  # carried from the LayerNorm
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3))
    convert(model, "gn", source=nn.BatchNorm1d, groups=3)
    assert type(model[0]) is znn.GroupNorm and type(model[1]) is nn.BatchNorm2d
    convert(model, "in2d", source=lambda m: isinstance(m, nn.BatchNorm2d))
    assert type(model[1]) is znn.InstanceNorm2d


def test_options_are_carried_unless_given():
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, affine=False, track_running_stats=False))
    convert(model, "gn", groups=2)
    assert model[0].eps == 1e-3 and model[0].weight is None
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=None))
    convert(model, "bn2d", eps=1e-4)
    assert model[0].eps == 1e-4 and model[0].momentum is None


def test_root_layer_callable_target_and_frozen_state():
    gen = torch.Generator().manual_seed(4)
    bn = _trained(nn.BatchNorm2d(4), gen)
    gn = convert(bn, "gn", groups=2)
    assert type(gn) is znn.GroupNorm and torch.equal(gn.weight, bn.weight)
    model = nn.Sequential(_trained(nn.BatchNorm2d(4), gen))
    w = model[0].weight.clone()
    convert(model, lambda old: nn.GroupNorm(1, old.num_features))
    assert type(model[0]) is nn.GroupNorm and torch.equal(model[0].weight, w)
    model = nn.Sequential(_trained(nn.BatchNorm2d(4), gen)).train()
    freeze(model)
    convert(model, "brn2d" if "brn2d" in normzoo.available() else "bn2d")
    new = model[0]
    assert is_frozen(new) and not new.training and not new.weight.requires_grad
    model.train()
    assert not new.training
    unfreeze(model)
    assert new.training and new.weight.requires_grad


def test_torch_round_trip_is_exact():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), _trained(nn.BatchNorm2d(4), gen), nn.InstanceNorm2d(4, affine=True),
        nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(16), nn.RMSNorm(16), nn.Unflatten(1, (4, 2, 2)),
        nn.Flatten(2), _trained(nn.BatchNorm1d(4), gen), nn.Flatten(), nn.Linear(16, 3),
        _trained(nn.BatchNorm1d(3, momentum=None), gen),
    ).eval()
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    state = copy.deepcopy(model.state_dict())
    ours = to_normzoo(model)
    assert not any(type(m).__module__.startswith("torch.nn.modules.") and "norm" in type(m).__module__
                   for m in ours.modules())
    assert type(ours[1]) is znn.BatchNorm2d and type(ours[6]) is znn.RMSNorm and ours[12].momentum is None
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    back = to_torch(ours)
    assert type(back[1]) is nn.BatchNorm2d and type(back[5]) is nn.LayerNorm
    torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in state.items())
    assert convert(back, "normzoo") is back and type(back[3]) is znn.GroupNorm


def test_to_torch_layernorm2d_and_missing_equivalents():
    ln = znn.LayerNorm2d(4)
    with torch.no_grad():
        ln.weight.uniform_()
    x = torch.randn(2, 4, 3, 3)
    model = to_torch(nn.Sequential(ln))
    assert type(model[0]) is nn.GroupNorm and model[0].num_groups == 1
    torch.testing.assert_close(model[0](x), ln(x), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(znn.BatchNorm2d(4), znn.MeanOnlyBatchNorm2d(4))
    with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm2d at '1'"):
        to_torch(model)
    assert type(model[0]) is znn.BatchNorm2d  # nothing changed
    to_torch(model, strict=False)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1]) is znn.MeanOnlyBatchNorm2d


def test_errors_leave_the_model_unchanged():
    model = nn.Sequential(nn.BatchNorm2d(6), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="num_groups"):
        convert(model, "gn", groups=3)  # divides 6 but not 4
    assert all(type(m) is nn.BatchNorm2d for m in model)
    with pytest.raises(ValueError, match="did you mean"):
        convert(model, "groupnrom")
    with pytest.raises(TypeError):
        convert(model, "gn", nonsense=1)
    with pytest.raises(TypeError, match="takes no source or layer options"):
        convert(model, "torch", groups=2)
    with pytest.raises(TypeError, match="target must be"):
        convert(model, 3)
    with pytest.raises(TypeError, match="nn.Module"):
        convert("model", "gn")
