"""BatchNorm with fixed statistics (eval mode): the kernel pair (native.batch_fixed_forward, native.batch_backward
with fixed=True), the compiled op behind channel_norm.fixed_affine, and the layers in eval against torch.nn."""
import pytest
import torch

import normzoo.nn as znn
from normzoo import functional as F
from normzoo import native, native_ops

pytestmark = pytest.mark.skipif(native.library() is None, reason="native kernels unavailable")


@pytest.fixture(autouse=True)
def threaded():
    """Two threads even on these small tensors (the compiled op keeps its own copy of the threshold)."""
    old, threads = native.PARALLEL_THRESHOLD, torch.get_num_threads()
    native.PARALLEL_THRESHOLD = 1024
    native_ops.rebind()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    native.PARALLEL_THRESHOLD = old
    native_ops.rebind()


@pytest.fixture(params=["compiled", "python"])
def ops_kind(request):
    """Both autograd paths of the op: the compiled one and the Python Function (where none can be compiled)."""
    if request.param == "compiled" and native_ops.ops() is None:
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    old = native_ops.use_compiled(request.param == "compiled")
    yield request.param
    native_ops.use_compiled(old)


def _data(shape, dtype, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    mean, var = torch.randn(c, generator=gen, dtype=torch.float64), torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return x, w, b, mean, var


def _view(t, x):
    return t.double().view((1, -1) + (1,) * (x.dim() - 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
# (40, 12, 3, 3): contiguous short rows as columns; (3, 7, 32, 33): rows in pieces; (64, 5): one position
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (40, 12, 3, 3), (3, 7, 32, 33), (64, 5)])
@pytest.mark.parametrize("mode", ["standard", "mean"])
def test_fixed_forward_and_backward_are_the_formula(dtype, sdtype, channels_last, shape, mode):
    """y = gamma (x - mean) rstd + beta with the statistics read in their own dtype (float16: a float64 copy), rstd =
    (var + eps)^-1/2 in double (mean-only: 1, without var); backward dx = gamma rstd dy, dgamma = sum dy (x - mean)
    rstd, dbeta = sum dy; the (2, C) block holds the mean and rstd used."""
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-d")
    x, w, b, mean, var = _data(shape, dtype, channels_last)
    mean_s, var_s = mean.to(sdtype), var.to(sdtype)
    eps = 1e-3
    y, stats = native.batch_fixed_forward(x, w, b, mean_s, None if mode == "mean" else var_s, eps, mode)
    rstd = torch.ones_like(var) if mode == "mean" else 1.0 / torch.sqrt(var_s.double() + eps)
    torch.testing.assert_close(stats[0], mean_s.double(), rtol=0, atol=0)
    torch.testing.assert_close(stats[1], rstd, rtol=1e-15, atol=0)
    expect = _view(w, x) * (x.double() - _view(mean_s, x)) * _view(rstd, x) + _view(b, x)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol * 4)

    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    dims = [0] + list(range(2, x.dim()))
    want_dx = dy.double() * _view(w, x) * _view(rstd, x)
    want_dg = (dy.double() * (x.double() - _view(mean_s, x)) * _view(rstd, x)).sum(dims)
    for dgamma, dbeta in [(True, True), (False, True), (False, False)]:
        dx, dg, db = native.batch_backward(dy, x, w, stats, mode, dgamma, dbeta, fixed=True)
        torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol)
        assert (dg is not None) == dgamma and (db is not None) == dbeta
        ptol = max(tol, 1e-6) * (1 + float(want_dg.abs().max()))  # (float32 w: float32 gradients)
        if dgamma:
            torch.testing.assert_close(dg.double(), want_dg, rtol=max(tol, 1e-6), atol=ptol)
        if dbeta:
            torch.testing.assert_close(db.double(), dy.double().sum(dims), rtol=max(tol, 1e-6), atol=ptol)


def test_fixed_forward_refuses_a_missing_variance():
    x, w, b, mean, _ = _data((2, 3, 4), torch.float32, False)
    with pytest.raises(ValueError, match="needs var"):
        native.batch_fixed_forward(x, w, b, mean, None, 1e-5, "standard")


def test_fixed_backward_of_an_infinite_input_is_finite(ops_kind):
    """dx = gamma rstd dy does not read x: an infinite input gives a finite dx, as torch's eval BatchNorm does."""
    for channels_last in (False, True):
        m, ref = znn.BatchNorm2d(5).eval(), torch.nn.BatchNorm2d(5).eval()
        x = torch.randn(3, 5, 4, 4)
        x[1, 2, 0, 0] = float("inf")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for module in (m, ref):
            module.weight.requires_grad_(False)
            module.bias.requires_grad_(False)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        m(xs[0]).sum().backward()
        ref(xs[1]).sum().backward()
        assert torch.isfinite(xs[0].grad).all()
        torch.testing.assert_close(xs[0].grad, xs[1].grad)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", [
    (znn.BatchNorm1d, torch.nn.BatchNorm1d, (16, 6)), (znn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 6, 9)),
    (znn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 6, 5, 7)), (znn.BatchNorm2d, torch.nn.BatchNorm2d, (40, 6, 3, 3)),
    (znn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 6, 3, 4, 5))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_eval_layers_equal_torch(ours_cls, torch_cls, shape, channels_last, frozen, ops_kind):
    """In eval, forward and backward as torch.nn's, the parameters trained or frozen, in both layouts."""
    if channels_last and len(shape) < 4:
        pytest.skip("channels_last is 4-d and 5-d")
    gen = torch.Generator().manual_seed(1)
    theirs = torch_cls(shape[1])
    with torch.no_grad():
        for t in (theirs.weight, theirs.bias, theirs.running_mean):
            t.copy_(torch.randn(t.shape, generator=gen))
        theirs.running_var.copy_(torch.rand(shape[1], generator=gen) + 0.5)
    ours = ours_cls(shape[1])
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape), torch.contiguous_format)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt if channels_last else torch.contiguous_format)
    dy = torch.randn(shape, generator=gen)
    grads = []
    for m in (ours, theirs):
        for p in m.parameters():
            p.requires_grad_(not frozen)
            p.grad = None
        xr = x.clone().requires_grad_()
        y = m(xr)
        y.backward(dy)
        grads.append([y.detach(), xr.grad] + [p.grad for p in m.parameters()])
    for a, r in zip(*grads):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: znn.BatchNorm2d(3), lambda: znn.MeanOnlyBatchNorm2d(3),
                                  lambda: znn.InstanceNorm2d(3, affine=True, track_running_stats=True)])
def test_eval_is_twice_differentiable(make, ops_kind):
    """The statistics are constants in eval: the layer is affine in x, and its second derivatives (through the
    compiled op's backward under create_graph) are gradchecked."""
    torch.manual_seed(0)
    m = make().double()
    m.train()
    m(torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1)
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0, 0.3)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(m.parameters())
    assert torch.autograd.gradgradcheck(lambda x, *ps: m(x), (x,) + params)
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x,) + params)


@pytest.mark.parametrize("frozen", [True, False])
def test_eval_keeps_the_input_only_for_parameter_gradients(frozen, ops_kind):
    """dx = gamma rstd dy does not read x: with frozen parameters (a frozen BatchNorm fine-tuned through) the op
    keeps no activation for its backward, and dx is still torch's; with trainable ones it keeps x (their sums)."""
    m, ref = znn.BatchNorm2d(6).eval(), torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
        m.weight.uniform_(0.5, 2)
    ref.load_state_dict(m.state_dict())
    for module in (m, ref):
        module.requires_grad_(not frozen)
    x = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 6, 5, 5)  # contiguous: the other layout than x
    sizes = []
    grads = []
    for module in (m, ref):
        xr = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y = module(xr)
        if module is m:
            ours_saved, sizes[:] = list(sizes), []
        y.backward(dy)
        grads.append(xr.grad)
    assert (x.numel() in ours_saved) == (not frozen)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_statistics_that_require_grad_take_the_tensor_formula():
    """Running statistics that require grad are differentiated (the tensor-operations route), as before."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    mean = torch.randn(3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: F.batch_norm(x, m, v, training=False), (mean, var))
