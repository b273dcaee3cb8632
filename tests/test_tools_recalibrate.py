"""recalibrate: both estimators against statistics computed by hand, dropout kept off, state restored (on error too)."""
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normzoo.nn as znn
from normzoo.tools import freeze, recalibrate

SIZES = [5, 3, 7, 2]  # unequal batches, the last one small


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 3, 1), znn.BatchNorm2d(3, momentum=None), nn.Dropout(0.5),
    )
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.fill_(7.0)  # stale statistics
            bn.running_var.fill_(9.0)
    return model


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 2, 5, 5, generator=gen) * 2 + 1 for n in SIZES]


def _by_hand(model, batches, bn1_frozen=False):
    """Each BN's inputs with BN in training mode (batch statistics) and dropout off; both estimators."""
    inputs = {1: [], 5: []}
    with torch.no_grad():
        for x in batches:
            a1 = model[0](x)
            inputs[1].append(a1)
            if bn1_frozen:
                h = TF.batch_norm(a1, model[1].running_mean, model[1].running_var, model[1].weight, model[1].bias)
            else:
                h = TF.batch_norm(a1, None, None, model[1].weight, model[1].bias, training=True)
            a2 = model[4](torch.relu(h))
            inputs[5].append(a2)
    out = {}
    for i, xs in inputs.items():
        xs = [x.double() for x in xs]
        allx = torch.cat(xs)
        pooled = (allx.mean((0, 2, 3)), allx.var((0, 2, 3), unbiased=True))
        average = (torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0),
                   torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0))
        out[i] = {"pooled": pooled, "average": average}
    return out


@pytest.mark.parametrize("estimator", ["pooled", "average"])
def test_statistics_match_the_hand_computation(estimator):
    model = _model()
    batches = _batches()
    expected = _by_hand(model, batches)
    loader = [(x, torch.zeros(len(x))) for x in batches]  # (input, target) pairs
    assert recalibrate(model, loader, estimator=estimator, progress=False) is model
    for i in (1, 5):
        mean, var = expected[i][estimator]
        torch.testing.assert_close(model[i].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[i].running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert int(model[i].num_batches_tracked) == len(batches)
    other = "average" if estimator == "pooled" else "pooled"
    assert not torch.allclose(expected[5][other][1], expected[5][estimator][1], rtol=1e-3)  # they differ


def test_average_is_what_momentum_none_accumulates():
    """The 'average' estimator equals torch's cumulative average over the same batches (dropout off)."""
    model = _model()
    batches = _batches()
    ref = _model()
    for bn in (ref[1], ref[5]):
        bn.reset_running_stats()
        bn.momentum = None
    ref.train()
    ref[3].eval(), ref[6].eval()
    with torch.no_grad():
        for x in batches:
            ref(x)
    recalibrate(model, batches, estimator="average", progress=False)
    for i in (1, 5):
        torch.testing.assert_close(model[i].running_mean, ref[i].running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[i].running_var, ref[i].running_var, rtol=1e-5, atol=1e-5)


def test_modes_momentum_and_hooks_are_restored():
    model = _model().train()
    model[5].eval()
    model[3].eval()
    modes = [m.training for m in model.modules()]
    recalibrate(model, iter(_batches()), progress=False)
    assert [m.training for m in model.modules()] == modes
    assert model[1].momentum == 0.3 and model[5].momentum is None
    assert not model[1]._forward_pre_hooks and not model[5]._forward_pre_hooks


def test_an_error_restores_everything_and_keeps_the_old_statistics():
    model = _model().train()
    batches = _batches()

    def loader():
        yield batches[0]
        yield batches[1]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        recalibrate(model, loader(), progress=False)
    for i in (1, 5):
        assert torch.all(model[i].running_mean == 7.0) and torch.all(model[i].running_var == 9.0)
        assert int(model[i].num_batches_tracked) == 0
        assert model[i].training and not model[i]._forward_pre_hooks
    assert model[1].momentum == 0.3 and model[5].momentum is None
    assert all(m.training for m in model.modules())


def test_num_batches_dict_items_and_progress(capsys):
    model = _model()
    batches = _batches()
    expected = _by_hand(model, batches[:2])
    loader = [{"image": x, "label": 0} for x in batches]
    with pytest.raises(TypeError, match="input_fn"):
        recalibrate(model, loader, progress=False)
    recalibrate(model, loader, num_batches=2, input_fn=lambda b: b["image"])
    err = capsys.readouterr().err
    assert "recalibrate: 2/2 batches done" in err
    mean, var = expected[5]["pooled"]
    torch.testing.assert_close(model[5].running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert int(model[5].num_batches_tracked) == 2
    recalibrate(model, batches, progress=False)
    assert capsys.readouterr().err == ""


def test_frozen_layers_are_kept_unless_included():
    model = _model()
    batches = _batches()
    freeze(model[:2])
    expected = _by_hand(model, batches, bn1_frozen=True)
    recalibrate(model, batches, progress=False)
    assert torch.all(model[1].running_mean == 7.0)  # frozen: kept, and in eval during the passes
    torch.testing.assert_close(model[5].running_mean.double(), expected[5]["pooled"][0], rtol=1e-5, atol=1e-5)
    recalibrate(model, batches, progress=False, include_frozen=True)
    assert not torch.all(model[1].running_mean == 7.0)
    assert not model[1].training  # still frozen


def test_argument_errors_and_models_without_batch_norm():
    model = _model()
    with pytest.raises(ValueError, match="estimator"):
        recalibrate(model, [], estimator="median")
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(model, [], num_batches=0)
    with pytest.raises(TypeError, match="cannot take the model input"):
        recalibrate(model, [3.0], progress=False)
    with pytest.warns(UserWarning, match="no BatchNorm-family layer"):
        recalibrate(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.randn(3, 2)])
    with pytest.warns(UserWarning, match="saw no data"):
        recalibrate(model, [], progress=False)
    assert torch.all(model[1].running_mean == 7.0)
