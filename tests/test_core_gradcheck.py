"""torch.autograd.gradcheck in float64 for every core layer, with and without affine parameters,
in train and eval mode, on well- and ill-conditioned data."""
import pytest
import torch

from normzoo import nn as znn

CASES = [
    (lambda a: znn.BatchNorm1d(3, affine=a), (5, 3)),
    (lambda a: znn.BatchNorm1d(3, affine=a), (4, 3, 3)),
    (lambda a: znn.BatchNorm2d(3, affine=a), (3, 3, 2, 3)),
    (lambda a: znn.BatchNorm3d(2, affine=a), (2, 2, 2, 2, 2)),
    (lambda a: znn.MeanOnlyBatchNorm2d(3, affine=a), (3, 3, 2, 2)),
    (lambda a: znn.InstanceNorm1d(3, affine=a), (2, 3, 5)),
    (lambda a: znn.InstanceNorm2d(3, affine=a, track_running_stats=True), (2, 3, 3, 2)),
    (lambda a: znn.GroupNorm(2, 4, affine=a), (2, 4, 3, 2)),
    (lambda a: znn.LayerNorm2d(3, affine=a), (2, 3, 2, 3)),
    (lambda a: znn.LayerNorm((3, 4), elementwise_affine=a), (2, 3, 4)),
    (lambda a: znn.RMSNorm(5, elementwise_affine=a, eps=1e-6), (3, 5)),
]


@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("loc", [0.5, 1e3])
def test_gradcheck_train(make, shape, affine, loc):
    torch.manual_seed(0)
    m = make(affine).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(1.0, 0.3)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + loc).requires_grad_()
    params = tuple(m.parameters())
    m.train()

    def f(x, *ps):
        return m(x)

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make,shape", [c for c in CASES if "BatchNorm" in c[0].__code__.co_names[0] or True][:5])
def test_gradcheck_eval(make, shape):
    torch.manual_seed(1)
    m = make(True).double()
    m.train()
    m(torch.randn(shape, dtype=torch.float64))
    m.eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x,) + tuple(m.parameters()))


def test_double_backward_is_not_silently_wrong():
    """The custom backward is first-order: asking for a second derivative must fail loudly or be right."""
    m = znn.BatchNorm1d(3).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("name,shape", [("bn2d", (3, 4, 3, 3)), ("in2d", (3, 4, 3, 3)), ("gn", (3, 4, 3, 3)),
                                        ("ln2d", (3, 4, 3, 3)), ("brn2d", (3, 4, 3, 3)), ("bin2d", (3, 4, 3, 3)),
                                        ("switch2d", (3, 4, 3, 3)), ("frn", (3, 4, 3, 3)),
                                        ("evonorm_b0", (3, 4, 3, 3)), ("evonorm_s0", (3, 4, 3, 3)),
                                        ("ln", (3, 5, 4)), ("rms", (3, 5, 4))])
def test_second_derivative_is_refused_but_first_order_under_create_graph_is_right(name, shape):
    """normzoo's once_differentiable skips torch's no_grad wrapper on the usual backward; under create_graph
    it must still give the right first derivative and refuse the second."""
    import copy

    import normzoo

    torch.manual_seed(0)
    m = normzoo.create(name, 4).double()
    twin = copy.deepcopy(m)  # the same running statistics for the second call (Batch Renorm's r and d use them)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    (g_plain,) = torch.autograd.grad(m(x).pow(2).sum(), x)
    (g,) = torch.autograd.grad(twin(x).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_plain)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_lean_apply_is_apply_outside_transforms_and_defers_to_it_under_them():
    """``lean_apply`` calls torch's C++ entry point directly: the same outputs, graph node and gradients as
    ``Function.apply``; under a ``torch.func`` transform it is the public ``apply`` (same error or result), and
    a Function with ``setup_context`` keeps the public ``apply``."""
    from normzoo._autograd import lean_apply

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

    class WithSetup(Scale):
        @staticmethod
        def forward(x, k):
            return x * k

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.k = inputs[1]

    lean = lean_apply(Scale)
    x = torch.randn(5, requires_grad=True)
    y, want = lean(x, 3.0), Scale.apply(x, 3.0)
    assert type(y.grad_fn) is type(want.grad_fn)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.full((5,), 3.0))
    assert lean_apply(WithSetup) == WithSetup.apply
    errors = []
    for fn in (lean, Scale.apply):
        try:
            torch.func.vmap(lambda t: fn(t, 2.0))(torch.randn(3, 4))
        except RuntimeError as exc:
            errors.append(str(exc))
    assert len(errors) == 2 and errors[0] == errors[1] and "setup_context" in errors[0]
