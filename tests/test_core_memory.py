"""Saved-for-backward memory: no more than torch.nn's for the same layer, and at most one input-sized
tensor plus O(N*C) statistics."""
import pytest
import torch

from normzoo import nn as znn


def saved_bytes(module, x):
    """Bytes of the distinct storages autograd saves during ``module(x)``, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


PAIRS = [
    (lambda: znn.BatchNorm2d(16), lambda: torch.nn.BatchNorm2d(16), (8, 16, 12, 12)),
    (lambda: znn.BatchNorm1d(16), lambda: torch.nn.BatchNorm1d(16), (64, 16)),
    (lambda: znn.InstanceNorm2d(16, affine=True), lambda: torch.nn.InstanceNorm2d(16, affine=True), (8, 16, 12, 12)),
    (lambda: znn.GroupNorm(4, 16), lambda: torch.nn.GroupNorm(4, 16), (8, 16, 12, 12)),
    (lambda: znn.LayerNorm(96), lambda: torch.nn.LayerNorm(96), (8, 32, 96)),
    (lambda: znn.RMSNorm(96), lambda: torch.nn.RMSNorm(96), (8, 32, 96)),
]


@pytest.mark.parametrize("ours,theirs,shape", PAIRS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_saved_memory_not_above_torch(ours, theirs, shape, channels_last):
    x = torch.randn(shape)
    if channels_last:
        if x.dim() != 4:
            pytest.skip("channels_last is for 4D input")
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    a, b = saved_bytes(ours(), x), saved_bytes(theirs(), x)
    n, c = shape[0], shape[1]
    assert a <= max(b, x.numel() * x.element_size() + 8 * n * c * 8), (a, b)
    assert a <= x.numel() * x.element_size() + 4 * n * c * 8


def test_ill_conditioned_input_saves_its_centred_copy_only():
    x = (torch.randn(8, 16, 12, 12) * 1e-3 + 1e4).requires_grad_()
    a = saved_bytes(znn.BatchNorm2d(16), x)
    assert a <= x.numel() * 4 + 4 * 8 * 16 * 8
