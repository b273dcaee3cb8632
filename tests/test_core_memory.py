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


def _example(name):
    """A module made by name and an input it takes (2d layers get NCHW, 1d (N, C, L), last-dim layers (N, L, D))."""
    import normzoo

    kwargs = {"compensate": False} if name.startswith("cbn") else {}
    module = normzoo.create(name, 8, **kwargs)
    if name in ("ln", "rms"):
        shape = (4, 16, 8)
    elif name.endswith("1d"):
        shape = (6, 8, 20)
    elif name.endswith("3d"):
        shape = (3, 8, 4, 5, 6)
    else:
        shape = (4, 8, 10, 10)
    return module, torch.randn(shape).requires_grad_()


def test_every_registered_layer_saves_at_most_its_input_plus_statistics():
    import normzoo

    for name in normzoo.available():
        module, x = _example(name)
        module.train()
        n, c = x.shape[0], x.shape[1]
        limit = x.numel() * x.element_size() + 16 * n * c * 8  # one input + O(N*C) float64 statistics
        assert saved_bytes(module, x) <= limit, name
