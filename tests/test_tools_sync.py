"""SyncBatchNorm and convert_sync: real gloo process groups on localhost against one process on the whole batch.

The distributed tests start 2 and 3 processes once each (``torch.multiprocessing`` from a fork server, a free port,
a gloo timeout and an overall deadline so that a hang fails instead of blocking), and every process checks
its slice of the outputs, input gradients, summed parameter gradients and running statistics against a
float64 reference computed by ``torch.nn.functional.batch_norm`` (or the mean-only formula) on the whole
batch, over equal, unequal and empty batches.
"""
from __future__ import annotations

import copy
import multiprocessing
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as tmp
import torch.nn.functional as TF
from torch import nn

import normzoo
import normzoo.nn as znn
from normzoo.nn.sync import SyncBatchNorm, all_gather_moments, sync_batch_norm, world_size
from normzoo.stats import moments
from normzoo.tools import convert_sync, freeze, is_frozen, revert_sync, to_torch

TIGHT = dict(rtol=1e-9, atol=1e-10)


def _close(actual, expected, rtol=1e-9, atol=1e-10, msg=""):
    """``torch.testing.assert_close`` for the worker processes: that one imports torch's DTensor stack (seconds)
    once a process group exists."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{msg}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}"
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"{msg}: max abs difference {err:.3g} (rtol={rtol}, atol={atol})")


# -- reference: one process, the whole batch ------------------------------------------------------------
def _reference(x, g, weight, bias, running_mean, running_var, mean_only, momentum):
    """Output, input grad and parameter grads of (mean-only) BN on the whole batch; updates the running stats."""
    x = x.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    if mean_only:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        y = w.view((1, -1) + (1,) * (x.dim() - 2)) * (x - mean) + b.view((1, -1) + (1,) * (x.dim() - 2))
        with torch.no_grad():
            m = moments(x.detach(), dims)
            running_mean.lerp_(m.mean, momentum)
            running_var.lerp_(m.var(1), momentum)
    else:
        y = TF.batch_norm(x, running_mean, running_var, w, b, training=True, momentum=momentum, eps=1e-5)
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad, b.grad


# (input shape of the whole batch, batch sizes per process (by world size), mean_only)
SCENARIOS = [
    ((6, 3, 4, 5), {2: [3, 3], 3: [2, 2, 2]}, False),        # equal batches
    ((7, 4), {2: [1, 6], 3: [1, 1, 5]}, False),                # unequal; a process with one row of (N, C) input
    ((5, 3, 6), {2: [0, 5], 3: [3, 0, 2]}, False),             # an empty process
    ((5, 2, 3, 2, 2), {2: [2, 3], 3: [0, 4, 1]}, True),        # mean-only, 3d input, an empty process
    ((6, 3, 2, 2), {2: [4, 2], 3: [1, 3, 2]}, True),           # mean-only, unequal
]


def _check_scenario(rank, world, index, shape, sizes, mean_only):
    gen = torch.Generator().manual_seed(100 + index)
    c = shape[1]
    layer = SyncBatchNorm(c, momentum=0.3, mean_only=mean_only, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    ref_mean = torch.zeros(c, dtype=torch.float64)
    ref_var = torch.ones(c, dtype=torch.float64)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    for step in range(2):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step) + 3.0
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        y_ref, dx_ref, dw_ref, db_ref = _reference(x, g, layer.weight.detach(), layer.bias.detach(), ref_mean,
                                                   ref_var, mean_only, 0.3)
        layer.zero_grad()
        xl = x[rows].clone().requires_grad_()
        y = layer(xl)
        (y * g[rows]).sum().backward()
        where = f"scenario {index}, rank {rank}/{world}, step {step}"
        _close(y, y_ref[rows], msg=f"output, {where}")
        _close(xl.grad, dx_ref[rows], msg=f"input grad, {where}")
        grads = torch.stack([layer.weight.grad, layer.bias.grad])
        torch.distributed.all_reduce(grads)  # what DDP does (up to its division by the world size)
        _close(grads[0], dw_ref, msg=f"weight grad, {where}")
        _close(grads[1], db_ref, msg=f"bias grad, {where}")
    _close(layer.running_mean, ref_mean)
    _close(layer.running_var, ref_var)
    assert int(layer.num_batches_tracked) == 2
    layer.eval()  # eval: the running statistics, no collective (rank 0 alone would not hang)
    if rank == 0:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        ref = TF.batch_norm(x, ref_mean, ref_var, layer.weight, layer.bias, False, 0.0, 1e-5) if not mean_only else \
            layer.weight.view((1, -1) + (1,) * (x.dim() - 2)) * (x - ref_mean.view((1, -1) + (1,) * (x.dim() - 2))) \
            + layer.bias.view((1, -1) + (1,) * (x.dim() - 2))
        _close(layer(x), ref)


def _small_model():
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), znn.MeanOnlyBatchNorm2d(4), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6),
    ).double()


def _check_model(rank, world):
    """convert_sync on a small model: outputs, input grads and summed parameter grads as one process."""
    sizes = {2: [3, 2], 3: [2, 0, 3]}[world]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 2, 5, 5, generator=gen, dtype=torch.float64)
    ref = _small_model()
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    (yr ** 2).sum().backward()
    model = convert_sync(_small_model())
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 3
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    xl = x[rows].clone().requires_grad_()
    y = model(xl)
    (y ** 2).sum().backward()
    _close(y, yr[rows].detach())
    _close(xl.grad, xr.grad[rows])
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad)
        _close(grad, p_ref.grad, msg=name)
    for b, b_ref in zip(model.buffers(), ref.buffers()):
        _close(b, b_ref)


def _check_float32_far_from_zero(rank, world):
    """Mean 1e4, std 1e-2 in float32 on unequal batches: the exact merge keeps the variance."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 3, 16, generator=gen, dtype=torch.float64) * 1e-2 + 1e4).float()
    sizes = {2: [2, 7], 3: [4, 1, 4]}[world]
    start = sum(sizes[:rank])
    y, batch = sync_batch_norm(x[start:start + sizes[rank]], None, None, 1e-8)
    xd, dims = x.double(), [0, 2]  # the exact statistics of the float32 values
    exact = (xd - xd.mean(dims, keepdim=True)) / torch.sqrt(xd.var(dims, unbiased=False, keepdim=True) + 1e-8)
    _close(y.double(), exact[start:start + sizes[rank]], rtol=0, atol=1e-4)
    _close(batch.var(0), xd.var(dims, unbiased=False), rtol=1e-6, atol=0)


def _check_errors(rank, world):
    """A whole group with one value per channel fails on every process alike (no process left waiting)."""
    layer = SyncBatchNorm(2).double()
    x = torch.randn(1 if rank == 0 else 0, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="SyncBatchNorm: expected more than 1 value"):
        layer(x)
    torch.distributed.barrier()


def _worker(rank, world, port, failures_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=30))
    try:
        assert world_size() == world
        for i, (shape, sizes, mean_only) in enumerate(SCENARIOS):
            _check_scenario(rank, world, i, shape, sizes[world], mean_only)
        _check_model(rank, world)
        _check_float32_far_from_zero(rank, world)
        _check_errors(rank, world)
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world, fn=None, deadline_s=120.0):
    """Run ``fn`` (default ``_worker``) on ``world`` processes; fail (and kill them) if they do not finish by the
    deadline."""
    # forkserver: torch and this module are imported once per test session (by the server), not once per
    # process; the server has run no thread pool, so forking from it is safe
    multiprocessing.set_forkserver_preload(["torch", __name__])
    ctx = tmp.start_processes(fn or _worker, args=(world, _free_port(), None), nprocs=world, join=False,
                              start_method="forkserver")
    end = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the child's traceback
            if time.monotonic() > end:
                pytest.fail(f"{world} processes did not finish within {deadline_s} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_sync_matches_one_process_on_the_whole_batch(world):
    _run_world(world)


# -- single process --------------------------------------------------------------------------------------
def test_without_process_group_it_is_batchnorm():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    assert world_size() == 1
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    sync, ref = SyncBatchNorm(3), znn.BatchNorm2d(3)
    for layer in (sync, ref):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    for step in range(2):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = sync(a), ref(b)
        ya.sum().backward(), yb.sum().backward()
        assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    assert torch.equal(sync.running_var, ref.running_var)
    sync.eval(), ref.eval()
    assert torch.equal(sync(x), ref(x))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        sync.train()(torch.randn(1, 3))  # one value per channel: the BatchNorm error, named


def test_sync_function_gradcheck_in_a_world_of_one():
    """The synchronized backward formula (used when the group has several processes), checked numerically."""
    torch.manual_seed(1)
    for mode, shape in (("standard", (3, 2, 4)), ("mean", (4, 3)), ("standard", (2, 2, 3, 2))):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: sync_batch_norm(x, w, b, mode=mode)[0], (x, w, b))


def test_plug_in_path_for_batch_renorm_style_coefficients():
    """global_batch_moments then sync_batch_norm with weight/bias expressions (BRN's gamma r, beta + gamma d)."""
    from normzoo.nn.sync import global_batch_moments

    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r, d = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64)

    def ours(x, gamma, beta):
        p, g = global_batch_moments(x)
        assert g.count == 20
        return sync_batch_norm(x, gamma * r, beta + gamma * d, prepared=p, moments=g)[0]

    def formula(x, gamma, beta):  # r, d constants: y = gamma (x_hat r + d) + beta
        mean, var = x.mean((0, 2), keepdim=True), x.var((0, 2), unbiased=False, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + 1e-5)
        return gamma.view(1, 3, 1) * (x_hat * r.view(1, 3, 1) + d.view(1, 3, 1)) + beta.view(1, 3, 1)

    torch.testing.assert_close(ours(x, gamma, beta), formula(x, gamma, beta))
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    a = torch.autograd.grad((ours(x, gamma, beta) * g).sum(), (x, gamma, beta))
    b = torch.autograd.grad((formula(x, gamma, beta) * g).sum(), (x, gamma, beta))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    with pytest.raises(ValueError, match="needs the matching 'moments'"):
        sync_batch_norm(x, prepared=global_batch_moments(x)[0])


def test_all_gather_moments_in_a_world_of_one_is_the_identity_merge():
    x = torch.randn(5, 3, dtype=torch.float64)
    m = moments(x, 0)
    out = all_gather_moments(m)
    assert out.count == 5
    torch.testing.assert_close(out.mean, m.mean)
    torch.testing.assert_close(out.m2, m.m2)


def test_sync_checkpoints_and_registry():
    layer = normzoo.create("syncbn", 4)
    assert isinstance(layer, SyncBatchNorm) and not layer.mean_only
    assert normzoo.create("syncmbn", 4).mean_only
    torch_bn = nn.BatchNorm2d(4)
    torch_bn.running_mean.fill_(2.0)
    layer.load_state_dict(torch_bn.state_dict())
    assert torch.equal(layer.running_mean, torch_bn.running_mean)
    assert set(layer.state_dict()) == set(nn.SyncBatchNorm(4).state_dict())


def test_convert_sync_and_revert_carry_everything():
    model = _small_model().float()
    model[1].running_mean.uniform_()
    model[4].running_var.uniform_(1, 2)
    model.eval()
    freeze(model[7:])
    before = copy.deepcopy(model)
    x = torch.randn(3, 2, 5, 5)
    converted = convert_sync(model)
    kinds = [type(m) for m in converted.modules() if isinstance(m, SyncBatchNorm)]
    assert len(kinds) == 3 and converted[4].mean_only and not converted[1].mean_only
    assert is_frozen(converted[7]) and not converted[7].weight.requires_grad
    assert not converted.training
    torch.testing.assert_close(converted(x), before(x))
    back = revert_sync(converted)
    assert [type(m) for m in back.modules()] == [type(m) for m in before.modules()]
    torch.testing.assert_close(back(x), before(x))
    for (k, v), (k2, v2) in zip(back.state_dict().items(), before.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert is_frozen(back[7])


def test_convert_sync_warns_about_batch_layers_it_cannot_sync_and_reverts_unknown_dims():
    class CustomBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(CustomBN(3), nn.GroupNorm(1, 3))
    with pytest.warns(UserWarning, match="CustomBN at '0'"):
        convert_sync(model)
    assert type(model[0]) is CustomBN and type(model[1]) is nn.GroupNorm  # GN has no batch statistics
    made = nn.Sequential(SyncBatchNorm(3), SyncBatchNorm(3, mean_only=True))
    revert_sync(made, default_dim=1)
    assert type(made[0]) is znn.BatchNorm1d and type(made[1]) is znn.MeanOnlyBatchNorm1d
    with pytest.raises(ValueError, match="default_dim"):
        revert_sync(made, default_dim=4)


def test_sync_to_torch_and_back():
    layer = SyncBatchNorm(3, momentum=0.2)
    layer.running_mean.fill_(1.5)
    t = to_torch(nn.Sequential(layer))[0]
    assert type(t) is nn.SyncBatchNorm and t.momentum == 0.2 and torch.equal(t.running_mean, layer.running_mean)
    with pytest.raises(ValueError, match="no torch equivalent"):
        to_torch(nn.Sequential(SyncBatchNorm(3, mean_only=True)))
