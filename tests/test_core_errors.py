"""Bad input gets a clear error naming the layer, what it expected and what it got."""
import pytest
import torch

import normzoo
from normzoo import functional as F
from normzoo import nn as znn


@pytest.mark.parametrize(
    "module,x,match",
    [
        (znn.BatchNorm2d(4), torch.randn(2, 4, 3), r"BatchNorm2d: expected 4D input \(N, C, H, W\), got 3D input of shape \(2, 4, 3\)"),
        (znn.BatchNorm2d(4), torch.randn(2, 5, 3, 3), r"BatchNorm2d: expected 4 channels in dim 1, got input of shape \(2, 5, 3, 3\) with 5 channels"),
        (znn.BatchNorm1d(4), torch.randn(1, 4), r"BatchNorm1d: expected more than 1 value per channel when training, got input of shape \(1, 4\)"),
        (znn.BatchNorm2d(4), torch.randn(1, 4, 1, 1), "more than 1 value per channel"),
        (znn.InstanceNorm2d(4), torch.randn(2, 4, 1, 1), "more than 1 spatial element"),
        (znn.GroupNorm(2, 4), torch.randn(2, 6, 3), "expected 4 channels"),
        (znn.LayerNorm(8), torch.randn(2, 7), r"last 1 dim\(s\) are normalized_shape=\(8,\)"),
        (znn.RMSNorm((2, 8)), torch.randn(3, 8), "normalized_shape=\\(2, 8\\)"),
        (znn.LayerNorm2d(3), torch.randn(3, 4), "expected 3D or 4D or 5D input"),
    ],
)
def test_shape_errors(module, x, match):
    with pytest.raises(ValueError, match=match):
        module(x)


@pytest.mark.parametrize(
    "module,x",
    [
        (znn.BatchNorm2d(2), torch.ones(2, 2, 3, 3, dtype=torch.long)),
        (znn.GroupNorm(1, 2), torch.ones(2, 2, 3, dtype=torch.int32)),
        (znn.LayerNorm(3), torch.ones(2, 3, dtype=torch.int64)),
        (znn.InstanceNorm1d(2), torch.ones(2, 2, 3, dtype=torch.uint8)),
    ],
)
def test_integer_input_is_a_type_error(module, x):
    with pytest.raises(TypeError, match=r"expected a floating-point input .* got dtype torch\."):
        module(x)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="BatchNorm1d: expected a torch.Tensor input, got list"):
        znn.BatchNorm1d(2)([[1.0, 2.0]])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: znn.BatchNorm2d(4, eps=0), "BatchNorm2d: eps must be a positive number, got 0"),
        (lambda: znn.BatchNorm2d(4, eps=-1e-5), "eps must be a positive number"),
        (lambda: znn.GroupNorm(3, 4), r"num_groups \(3\) must divide num_channels \(4\)"),
        (lambda: znn.GroupNorm(2, 4, eps=0.0), "GroupNorm: eps must be a positive number"),
        (lambda: znn.LayerNorm(4, eps=0), "LayerNorm: eps must be a positive number"),
        (lambda: znn.BatchNorm1d(0), "num_features must be a positive int, got 0"),
        (lambda: znn.BatchNorm1d(4, momentum=1.5), r"momentum must be a number in \[0, 1\] or None"),
        (lambda: znn.LayerNorm(()), "normalized_shape must be a positive int"),
        (lambda: normzoo.create("gn", 10, groups=4), r"num_groups \(4\) must divide num_channels \(10\)"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_functional_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match=r"batch_norm: expected weight of shape \(3,\), got \(4,\)"):
        F.batch_norm(x, None, None, torch.ones(4), None, training=True)
    with pytest.raises(ValueError, match="group_norm: num_groups"):
        F.group_norm(x, 2)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        F.layer_norm(x, (2,), eps=0)
    with pytest.raises(ValueError, match="use_input_stats=False needs running_mean"):
        F.instance_norm(x, use_input_stats=False)


def test_eval_with_one_sample_is_fine():
    bn = znn.BatchNorm1d(3).eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)
