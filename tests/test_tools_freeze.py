"""freeze / unfreeze: model.train() cannot unfreeze, the previous state comes back exactly, copies keep it."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import normzoo.nn as znn
from normzoo.tools import freeze, frozen_layers, is_frozen, is_norm, unfreeze


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), znn.BatchNorm2d(4),
                         nn.GroupNorm(2, 4), nn.Dropout(0.5))


def test_model_train_cannot_unfreeze():
    model = _model().train()
    assert freeze(model) is model
    assert frozen_layers(model) == ["1", "4"]  # the BatchNorm family; GroupNorm has no batch statistics
    model.train()
    assert model.training and model[0].training and model[6].training
    for bn in (model[1], model[4]):
        assert is_frozen(bn) and not bn.training
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
    before = [bn.running_mean.clone() for bn in (model[1], model[4])]
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    for bn, b in zip((model[1], model[4]), before):
        assert torch.equal(bn.running_mean, b) and bn.weight.grad is None
    assert model[0].weight.grad is not None and model[5].weight.grad is not None


def test_unfreeze_restores_exactly_the_previous_state():
    model = _model().train()
    model[4].eval()
    model[4].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    freeze(model)
    assert unfreeze(model) is model
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert frozen_layers(model) == [] and "train" not in model[1].__dict__


def test_unfreeze_gives_the_mode_last_requested():
    model = _model().eval()
    freeze(model)
    model.train()
    unfreeze(model)
    assert model[1].training and model[4].training  # as if never frozen
    freeze(model)
    model.eval()
    unfreeze(model)
    assert not model[1].training


def test_trainable_affine_and_predicate():
    model = _model()
    freeze(model, trainable_affine=True)
    assert model[1].weight.requires_grad and not model[1].training
    freeze(model, predicate=is_norm)  # every norm layer, GroupNorm's affine too
    assert not model[1].weight.requires_grad and not model[5].weight.requires_grad and is_frozen(model[5])
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freezing_twice_keeps_the_first_record():
    model = _model().train()
    freeze(model)
    freeze(model, trainable_affine=True)  # affine back to its pre-freeze flags
    assert model[1].weight.requires_grad and not model[1].training
    unfreeze(model)
    assert model[1].training and model[1].weight.requires_grad


def test_copies_keep_the_frozen_state_and_state_dict_does_not_carry_it():
    model = freeze(_model().train())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert is_frozen(clone[1]) and not clone[1].training and clone[0].training
        unfreeze(clone)
        assert clone[1].training
    assert is_frozen(model[1]) and not model[1].training  # the original is unaffected
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    fresh.load_state_dict(torch.load(buf))
    assert not is_frozen(fresh[1]) and set(fresh.state_dict()) == set(model.state_dict())


def test_layers_without_running_statistics_warn_and_bad_arguments():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match="BatchNorm2d at '0'"):
        freeze(model)
    assert is_frozen(model[0])
    with pytest.raises(TypeError):
        freeze("model")
    with pytest.raises(TypeError):
        unfreeze(None)
    with pytest.raises(ValueError, match="boolean"):
        model[0].train("yes")
    single = nn.BatchNorm1d(3)
    assert freeze(single) is single and is_frozen(single) and not single.training
