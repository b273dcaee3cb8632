"""The core layers side by side with torch.nn: outputs, gradients, running statistics, checkpoints."""
import copy

import pytest
import torch
import torch.nn.functional as TF

import normzoo
from normzoo import functional as F
from normzoo import nn as znn

TOL = dict(rtol=1e-4, atol=2e-5)

# (normzoo class, torch class, constructor args, input shape, uses running stats)
PAIRS = [
    (znn.BatchNorm1d, torch.nn.BatchNorm1d, (6,), (9, 6), True),
    (znn.BatchNorm1d, torch.nn.BatchNorm1d, (6,), (5, 6, 7), True),
    (znn.BatchNorm2d, torch.nn.BatchNorm2d, (6,), (5, 6, 7, 3), True),
    (znn.BatchNorm3d, torch.nn.BatchNorm3d, (4,), (3, 4, 5, 2, 3), True),
    (znn.InstanceNorm1d, torch.nn.InstanceNorm1d, (6,), (4, 6, 9), False),
    (znn.InstanceNorm2d, torch.nn.InstanceNorm2d, (6,), (4, 6, 5, 5), False),
    (znn.InstanceNorm3d, torch.nn.InstanceNorm3d, (3,), (2, 3, 4, 3, 2), False),
    (znn.GroupNorm, torch.nn.GroupNorm, (3, 6), (4, 6, 5, 3), False),
    (znn.GroupNorm, torch.nn.GroupNorm, (2, 6), (4, 6), False),
    (znn.LayerNorm, torch.nn.LayerNorm, (7,), (3, 4, 7), False),
    (znn.LayerNorm, torch.nn.LayerNorm, ((4, 7),), (3, 4, 7), False),
    (znn.RMSNorm, torch.nn.RMSNorm, (7,), (3, 4, 7), False),
]


def _randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)


def _run_steps(ours, theirs, shape, steps, gen, channels_last=False, loc=1.5, scale=2.0):
    for _ in range(steps):
        x = torch.randn(shape, generator=gen) * scale + loc
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        g = torch.randn(y1.shape, generator=gen)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(y1, y2, **TOL)
        torch.testing.assert_close(x1.grad, x2.grad, **TOL)
        for (n1, p1), (_, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, **TOL, msg=n1)
    return y1


@pytest.mark.parametrize("ours_cls,torch_cls,args,shape,running", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_over_training_steps(ours_cls, torch_cls, args, shape, running, momentum):
    gen = torch.Generator().manual_seed(1)
    kwargs = {}
    if running or ours_cls in (znn.InstanceNorm1d, znn.InstanceNorm2d, znn.InstanceNorm3d):
        kwargs["momentum"] = momentum
        if ours_cls not in (znn.BatchNorm1d, znn.BatchNorm2d, znn.BatchNorm3d):
            if momentum is None:
                pytest.skip("torch's InstanceNorm never updates its running stats with momentum=None")
            kwargs.update(affine=True, track_running_stats=True)
            running = True
    theirs = torch_cls(*args, **kwargs)
    ours = ours_cls(*args, **kwargs)
    _randomize(theirs, gen)
    ours.load_state_dict(theirs.state_dict())
    _run_steps(ours, theirs, shape, 3, gen)
    if running:
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
        if isinstance(theirs, torch.nn.modules.batchnorm._BatchNorm):  # torch's InstanceNorm never counts
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    _run_steps(ours, theirs, shape, 1, gen)
    # and the checkpoint goes back
    theirs.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())


@pytest.mark.parametrize(
    "ours_cls,torch_cls,args,shape",
    [
        (znn.BatchNorm2d, torch.nn.BatchNorm2d, (6,), (4, 6, 5, 7)),
        (znn.BatchNorm3d, torch.nn.BatchNorm3d, (4,), (3, 4, 5, 2, 3)),
        (znn.GroupNorm, torch.nn.GroupNorm, (3, 6), (4, 6, 5, 3)),
        (znn.InstanceNorm2d, torch.nn.InstanceNorm2d, (6,), (4, 6, 5, 5)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_channels_last_kept_and_matches(ours_cls, torch_cls, args, shape, momentum):
    gen = torch.Generator().manual_seed(2)
    kw = {"momentum": momentum} if ours_cls in (znn.BatchNorm2d, znn.BatchNorm3d) else {}
    theirs, ours = torch_cls(*args, **kw), ours_cls(*args, **kw)
    ours.load_state_dict(theirs.state_dict())
    y = _run_steps(ours, theirs, shape, 2, gen, channels_last=True)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)
    if hasattr(theirs, "running_mean") and theirs.running_mean is not None:
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def test_cumulative_average_with_momentum_none_is_mean_of_unbiased_batch_stats():
    gen = torch.Generator().manual_seed(3)
    bn = znn.BatchNorm2d(3, momentum=None)
    batches = [torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * (i + 1) + i for i in range(5)]
    bn = bn.double()
    for x in batches:
        bn(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    vars_ = torch.stack([x.var((0, 2, 3), correction=1) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, vars_)


def test_instance_norm_momentum_none_updates_cumulatively():
    """torch's InstanceNorm silently never updates with momentum=None; normzoo keeps the cumulative average."""
    gen = torch.Generator().manual_seed(4)
    m = znn.InstanceNorm2d(3, momentum=None, track_running_stats=True).double()
    xs = [torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) + i for i in range(4)]
    for x in xs:
        m(x)
    expect_mean = torch.stack([x.mean((2, 3)).mean(0) for x in xs]).mean(0)
    expect_var = torch.stack([x.var((2, 3), correction=1).mean(0) for x in xs]).mean(0)
    torch.testing.assert_close(m.running_mean, expect_mean)
    torch.testing.assert_close(m.running_var, expect_var)


def test_layer_norm_2d_equals_group_norm_one_group():
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(F.layer_norm_2d(x, w, b), TF.group_norm(x, 1, w, b))


def test_mean_only_batch_norm():
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64) * 3 + 2
    m = znn.MeanOnlyBatchNorm2d(4).double()
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.bias.fill_(0.5)
    y = m(x)
    expect = 2.0 * (x - x.mean((0, 2, 3), keepdim=True)) + 0.5
    torch.testing.assert_close(y, expect)
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean((0, 2, 3)))
    m.eval()
    torch.testing.assert_close(m(x), 2.0 * (x - m.running_mean.view(1, -1, 1, 1)) + 0.5)
    # a torch BatchNorm2d checkpoint loads into it
    m.load_state_dict(torch.nn.BatchNorm2d(4).double().state_dict())


def test_torch_checkpoint_loads_into_normzoo_and_back():
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    theirs.train()
    theirs(torch.randn(4, 3, 9, 9))
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), znn.BatchNorm2d(8), torch.nn.ReLU())
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ours(x), theirs(x))
    back = copy.deepcopy(theirs)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), theirs(x))


def test_old_checkpoint_without_num_batches_tracked_loads():
    sd = torch.nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    m = znn.BatchNorm2d(4)
    m.load_state_dict(sd)
    assert int(m.num_batches_tracked) == 0


def test_no_running_stats_uses_batch_stats_in_eval():
    x = torch.randn(5, 3, 4, 4)
    ours, theirs = znn.BatchNorm2d(3, track_running_stats=False).eval(), torch.nn.BatchNorm2d(3, track_running_stats=False).eval()
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()


def test_constant_channel_normalizes_to_beta():
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = 3.0
    bn = znn.BatchNorm2d(3)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    y = bn(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], 0.2))
    gn = znn.GroupNorm(3, 3)
    assert torch.isfinite(gn(x)).all()


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.batch_norm(x, None, None, training=True),
        lambda x: F.instance_norm(x),
        lambda x: F.group_norm(x, 3),
        lambda x: F.layer_norm_2d(x),
    ],
)
def test_float32_mean_1e4_std_1e3_normalizes_like_float64(fn):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64) * 1e-3 + 1e4).float()
    y = fn(x)
    ref = fn(x.double())
    assert (y.double() - ref).abs().max() < 1e-2


def test_layer_norm_is_stable_where_torch_is_not():
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(6, 256, generator=gen, dtype=torch.float64) * 1e-3 + 1e4).float()
    ref = TF.layer_norm(x.double(), (256,))
    assert (F.layer_norm(x, (256,)).double() - ref).abs().max() < 1e-2


def test_bfloat16_mean_1000_matches_rounded_float64_answer():
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 3, 20, 20, generator=gen) + 1000).bfloat16()
    y = F.batch_norm(x, None, None, training=True)
    assert y.dtype == torch.bfloat16
    ref = TF.batch_norm(x.double(), None, None, training=True)
    assert ((y.double() - ref).abs() / ref.abs().clamp_min(1)).max() < 1e-2
    assert (y.double() - ref.bfloat16().double()).abs().max() <= 2 ** -6  # within one bf16 ulp at |y| < 4


def test_create_by_name():
    assert isinstance(normzoo.create("bn2d", 8), znn.BatchNorm2d)
    gn = normzoo.create("gn", 64, groups=16)
    assert isinstance(gn, znn.GroupNorm) and gn.num_groups == 16 and gn.num_channels == 64
    assert normzoo.create("gn", 48).num_groups == 24  # largest divisor <= 32
    assert normzoo.create("in2d", 8).affine
    assert normzoo.create("ln", 768).normalized_shape == (768,)
    assert normzoo.create("BN1D", 4).num_features == 4
    with pytest.raises(ValueError, match="unknown normalization 'bnn2d'.*did you mean"):
        normzoo.create("bnn2d", 8)
    for name in ["bn1d", "bn2d", "bn3d", "mbn1d", "mbn2d", "mbn3d", "ln", "ln2d", "in1d", "in2d", "in3d", "gn", "rms"]:
        assert name in normzoo.available()


def test_repr_and_reset():
    bn = znn.BatchNorm2d(4, momentum=None)
    assert repr(bn) == repr(torch.nn.BatchNorm2d(4, momentum=None))
    assert repr(znn.GroupNorm(2, 4)) == repr(torch.nn.GroupNorm(2, 4))
    assert repr(znn.InstanceNorm2d(4)) == repr(torch.nn.InstanceNorm2d(4))
    nb = znn.BatchNorm2d(4, bias=False)
    assert nb.bias is None and set(nb.state_dict()) == set(torch.nn.BatchNorm2d(4, bias=False).state_dict())
    assert repr(znn.LayerNorm(5)) == repr(torch.nn.LayerNorm(5))
    bn(torch.randn(3, 4, 2, 2))
    bn.reset_parameters()
    assert int(bn.num_batches_tracked) == 0 and torch.all(bn.running_var == 1) and torch.all(bn.weight == 1)


def test_device_and_dtype_factory_kwargs():
    bn = znn.BatchNorm2d(3, dtype=torch.float64)
    assert bn.weight.dtype == torch.float64 and bn.running_mean.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    ln = znn.LayerNorm(4, bias=False)
    assert ln.bias is None and "bias" not in ln.state_dict()


def test_count_batch_counts_like_add_on_every_kind_of_counter():
    """num_batches_tracked: the direct CPU bump and the add_ fallback give the same counts and types."""
    from normzoo.running import count_batch_

    plain = torch.tensor(0, dtype=torch.long)
    assert [count_batch_(plain) for _ in range(3)] == [1, 2, 3]
    assert plain.dtype == torch.long and plain.dim() == 0 and int(plain) == 3
    other = torch.tensor(5, dtype=torch.int32)  # not int64: the add_ path
    assert count_batch_(other) == 6 and other.dtype == torch.int32
    with torch.inference_mode():
        frozen = torch.tensor(0, dtype=torch.long)
    with pytest.raises(RuntimeError):  # an inference tensor cannot be changed in place outside inference mode
        count_batch_(frozen)


def test_momentum_none_is_the_cumulative_average_with_the_fast_counter():
    from normzoo import nn as znn

    torch.manual_seed(0)
    ours, ref = znn.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for _ in range(4):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        ours(x), ref(x)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("policy", ["batch", "instance", "group"])
def test_channel_norm_without_moments_gives_the_same_output_and_running_update(policy):
    """moments=False (the functional layers' hot path) only skips assembling the returned moments."""
    from normzoo.channel_norm import Policy, channel_norm
    from normzoo.running import Running

    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    pol = Policy(policy, 3) if policy == "group" else Policy(policy)
    runs = [Running(torch.zeros(6), torch.ones(6), 0.1) for _ in range(2)] if policy != "group" else [None, None]
    y1, m1 = channel_norm(x, None, None, pol, running=runs[0])
    y2, m2 = channel_norm(x, None, None, pol, running=runs[1], moments=False)
    assert m2 is None and m1 is not None
    torch.testing.assert_close(y1, y2)
    if runs[0] is not None:
        torch.testing.assert_close(runs[0].mean, runs[1].mean)
        torch.testing.assert_close(runs[0].var, runs[1].var)
        assert not torch.equal(runs[1].mean, torch.zeros(6))  # the update happened


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rms_norm_default_eps_is_torchs_for_every_dtype(dtype):
    """``eps=None``: torch uses the epsilon of the type it computes the statistics in (float32's for bfloat16 and
    float16 input, not the input dtype's that its documentation names). Rows with a small mean square show it:
    bfloat16's epsilon (2^-7) would shrink them by an order of magnitude."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=gen) * torch.logspace(-3, 0, 64).unsqueeze(1)
    x = x.to(dtype).requires_grad_()
    ours, theirs = znn.RMSNorm(3).to(dtype), torch.nn.RMSNorm(3).to(dtype)
    y, want = ours(x), theirs(x)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(y.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["bn2d", "in2d", "gn", "ln2d", "brn2d", "bin2d", "switch2d"])
def test_parametrized_and_swapped_parameters_reach_the_forward(name):
    """The layers read their parameters from the module's dictionaries where they are, and through getattr where
    they are not: a parametrization's weight (torch.nn.utils.parametrize) and torch.func.functional_call's
    swapped tensors are what the forward uses."""
    from torch.func import functional_call
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    plain, doubled = normzoo.create(name, 8), normzoo.create(name, 8)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(8) + 0.5)
        doubled.weight.copy_(plain.weight / 2)
    parametrize.register_parametrization(doubled, "weight", Double())
    torch.testing.assert_close(doubled(x), plain(x))
    fresh = normzoo.create(name, 8)
    same = copy.deepcopy(fresh)  # the same running statistics (Batch Renorm's training output depends on them)
    params = {"weight": torch.rand(8) + 0.5, "bias": torch.randn(8)}
    with torch.no_grad():
        same.weight.copy_(params["weight"])
        same.bias.copy_(params["bias"])
    torch.testing.assert_close(functional_call(fresh, params, (x,)), same(x))
