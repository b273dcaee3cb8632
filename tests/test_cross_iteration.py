"""Cross-Iteration BN (Yao et al. 2021): window 1 is BN, exact pooling with fixed weights, Taylor compensation."""
import copy

import pytest
import torch
from torch import nn

import normzoo
from normzoo import nn as znn
from normzoo.channel_norm import Policy, channel_norm
from normzoo.nn.cross_iteration import batch_moment_grads
from normzoo.stats import Moments

TOL = dict(rtol=1e-4, atol=2e-5)
TIGHT = dict(rtol=1e-10, atol=1e-12)
F64 = torch.float64


@pytest.mark.parametrize("attach", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_window_one_is_batchnorm(attach, momentum):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    theirs, bn = nn.BatchNorm2d(3, momentum=momentum), znn.BatchNorm2d(3, momentum=momentum)
    ours = znn.CrossIterationBatchNorm2d(3, momentum=momentum, window=1)
    if attach:
        ours.attach(conv)
    for step in range(4):
        for m in (ours, theirs, bn):
            m.train(step < 3)
        x = torch.randn(3, 2, 4, 4, generator=gen)
        h = conv(x)
        hs = [h.detach().clone().requires_grad_() for _ in range(2)]
        ys = [ours(h)] + [m(hi) for m, hi in zip((theirs, bn), hs)]
        g = torch.randn(ys[0].shape, generator=gen)
        grads = [torch.autograd.grad(ys[0], (h, ours.weight, ours.bias), g)]
        grads += [torch.autograd.grad(y, (hi, m.weight, m.bias), g) for y, hi, m in zip(ys[1:], hs, (theirs, bn))]
        for y, gr in zip(ys[1:], grads[1:]):
            torch.testing.assert_close(ys[0], y, **TOL)
            for a, b in zip(grads[0], gr):
                torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOL)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)


def _conv_cbn(window, burn_in=0, compensate=True, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias).double()
    cbn = znn.CrossIterationBatchNorm2d(4, window=window, burn_in=burn_in, compensate=compensate).double()
    if compensate:
        cbn.attach(conv)
    return conv, cbn


def test_fixed_weights_pool_the_last_k_batches_exactly():
    """With unchanged weights the window statistics are BatchNorm statistics of the last k batches together."""
    gen = torch.Generator().manual_seed(1)
    conv, cbn = _conv_cbn(window=3)
    xs = [torch.randn(2, 3, 5, 5, generator=gen, dtype=F64) * 2 + 1 for _ in range(5)]
    with torch.no_grad():
        for x in xs[:-1]:
            cbn(conv(x))
    h = conv(xs[-1])
    y = cbn(h)
    pooled = torch.cat([conv(x) for x in xs[-3:]]).detach()
    mu, var = pooled.mean((0, 2, 3)), pooled.var((0, 2, 3), unbiased=False)
    w = cbn.last_window
    torch.testing.assert_close(w.window_mean, mu, **TIGHT)
    torch.testing.assert_close(w.window_var, var, **TIGHT)
    torch.testing.assert_close(w.mean, w.raw_mean, **TIGHT)  # nothing to compensate
    assert w.count.tolist() == [50.0, 50.0, 50.0]
    # output: the current batch normalized with the pooled statistics; gradient through the current batch only
    h_ref = h.detach().clone().requires_grad_()
    past = conv(torch.cat(xs[-3:-1])).detach()
    allh = torch.cat([past, h_ref])
    mu_r, var_r = allh.mean((0, 2, 3), keepdim=True), allh.var((0, 2, 3), unbiased=False, keepdim=True)
    y_ref = (h_ref - mu_r) / torch.sqrt(var_r + cbn.eps) * cbn.weight.view(1, -1, 1, 1) + cbn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, y_ref, **TIGHT)
    g = torch.randn(y.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(torch.autograd.grad(y, h, g)[0], torch.autograd.grad(y_ref, h_ref, g)[0], **TIGHT)


def test_gradcheck_window_statistics_float64():
    """The window op: constant past moments merged into the batch's (channel_norm's ``extra``)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 3, 2, generator=gen, dtype=F64, requires_grad=True)
    w = torch.rand(3, generator=gen, dtype=F64).add_(0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=F64, requires_grad=True)
    past = Moments(torch.tensor([[7.0], [12.0]], dtype=F64), torch.randn(2, 3, generator=gen, dtype=F64),
                   torch.rand(2, 3, generator=gen, dtype=F64) * 5).reduce(0, keepdim=True)
    fn = lambda x, w, b: channel_norm(x, w, b, Policy("batch"), 1e-5, extra=past)[0]
    assert torch.autograd.gradcheck(fn, (x, w, b))


def _train(conv, cbn, steps, lr, gen):
    """SGD steps on a regression loss through conv + CBN; returns the inputs seen."""
    opt = torch.optim.SGD(list(conv.parameters()) + list(cbn.parameters()), lr=lr)
    target = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)
    inputs = []
    for _ in range(steps):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64) + 0.5
        inputs.append(x)
        loss = (cbn(conv(x)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return inputs


@pytest.mark.parametrize("bias", [True, False])
def test_taylor_compensation_tracks_the_current_weights(bias):
    """The paper's claim: compensated statistics approximate those recomputed with the current weights
    (the mean exactly, it is linear in W; the variance to second order in the weight change)."""
    errors = {}
    for lr in (0.02, 0.005):
        gen = torch.Generator().manual_seed(3)
        conv, cbn = _conv_cbn(window=4, bias=bias)
        inputs = _train(conv, cbn, 6, lr, gen)
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64)
        with torch.no_grad():
            cbn(conv(x))
            truth = [conv(h) for h in [x] + inputs[::-1][:3]]
        w = cbn.last_window
        t_mean = torch.stack([t.mean((0, 2, 3)) for t in truth])
        t_var = torch.stack([t.var((0, 2, 3), unbiased=False) for t in truth])
        torch.testing.assert_close(w.mean, t_mean, **TIGHT)
        naive = (w.raw_var - t_var).abs().max().item()
        comp = (w.var - t_var).abs().max().item()
        assert (w.raw_mean - t_mean).abs().max() > 1e-3 and naive > 1e-4  # the weights did move
        assert comp < 0.25 * naive
        errors[lr] = (comp, naive)
    # first-order method: the compensated error falls faster than the naive one as the steps shrink
    assert errors[0.005][0] / errors[0.02][0] < 0.5 * errors[0.005][1] / errors[0.02][1]


def test_naive_window_without_compensation():
    gen = torch.Generator().manual_seed(4)
    conv, cbn = _conv_cbn(window=3, compensate=False)
    assert cbn.layer is None
    _train(conv, cbn, 4, 0.05, gen)
    with torch.no_grad():
        cbn(conv(torch.randn(2, 3, 5, 5, generator=gen, dtype=F64)))
    w = cbn.last_window
    torch.testing.assert_close(w.mean, w.raw_mean, **TIGHT)
    torch.testing.assert_close(w.var, w.raw_var, **TIGHT)
    merged = Moments(w.count.unsqueeze(1), w.raw_mean, w.raw_var * w.count.unsqueeze(1)).reduce(0)
    torch.testing.assert_close(w.window_mean, merged.mean, **TIGHT)
    cbn.attach(conv)
    cbn.compensate = True  # switching the mode forgets the stored iterations
    assert float(cbn.window_count.sum()) == 0


def test_burn_in_is_plain_batchnorm_then_the_window_is_full():
    gen = torch.Generator().manual_seed(5)
    conv, cbn = _conv_cbn(window=3, burn_in=4)
    bn = nn.BatchNorm2d(4).double()
    for step in range(6):
        h = conv(torch.randn(2, 3, 5, 5, generator=gen, dtype=F64))
        y = cbn(h)
        if step < 4:
            torch.testing.assert_close(y, bn(h), **TIGHT)
            assert cbn.last_window is None
        else:
            assert cbn.last_window.count.tolist() == [50.0, 50.0, 50.0]
    assert int(cbn.iteration) == 6


def test_state_follows_to_and_state_dict():
    gen = torch.Generator().manual_seed(6)
    conv, cbn = _conv_cbn(window=3)
    _train(conv, cbn, 3, 0.01, gen)
    model = nn.Sequential(conv, cbn)
    clone = copy.deepcopy(model)
    # a fresh model, attached, loads the window and continues exactly as the original
    conv2 = nn.Conv2d(3, 4, 3, padding=1).double()
    cbn2 = znn.CrossIterationBatchNorm2d(4, window=3).double()
    fresh = nn.Sequential(conv2, cbn2)
    fresh.load_state_dict(model.state_dict())
    cbn2.attach(conv2)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=F64)
    outs = [m(x) for m in (model, clone, fresh)]
    torch.testing.assert_close(outs[0], outs[1], **TIGHT)
    torch.testing.assert_close(outs[0], outs[2], **TIGHT)
    assert int(cbn2.iteration) == int(cbn.iteration)
    model.float()
    assert all(t.dtype == torch.float32 for n, t in cbn.state_dict().items() if n.startswith("window"))
    assert model(x.float()).dtype == torch.float32
    missing, unexpected = znn.CrossIterationBatchNorm2d(4).load_state_dict(nn.BatchNorm2d(4).state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {"iteration"} | {n for n in cbn.state_dict() if n.startswith("window")}


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(5, 4), (7, 5)),
    (lambda: nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect"), (3, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (3, 4, 9, 8)),
    (lambda: nn.Conv2d(4, 6, 2, padding="same", padding_mode="circular", bias=False), (2, 4, 5, 6)),
])
def test_analytic_moment_gradients_match_autograd(make, shape):
    torch.manual_seed(7)
    layer = make().double()
    x = torch.randn(shape, dtype=F64) + 0.3
    y = layer(x)
    dims = [0] + list(range(2, y.dim()))
    mu, var = y.mean(dims), y.var(dims, unbiased=False)
    c = y.shape[1]
    auto_mu = torch.stack([torch.autograd.grad(mu[j], layer.weight, retain_graph=True)[0][j] for j in range(c)])
    auto_var = torch.stack([torch.autograd.grad(var[j], layer.weight, retain_graph=True)[0][j] for j in range(c)])
    dmean, dvar = batch_moment_grads(layer, x, y)
    groups = dmean.shape[0]
    assert dvar.abs().max() > 1e-3
    torch.testing.assert_close(dmean.repeat_interleave(c // groups, 0), auto_mu.reshape(c, -1), **TIGHT)
    torch.testing.assert_close(dvar, auto_var.reshape(c, -1), **TIGHT)


def test_linear_with_cbn1d_and_unequal_batches():
    gen = torch.Generator().manual_seed(8)
    lin = nn.Linear(5, 3).double()
    cbn = normzoo.create("cbn1d", 3, window=3).double().attach(lin)
    xs = [torch.randn(n, 5, generator=gen, dtype=F64) for n in (4, 9, 6)]
    with torch.no_grad():
        for x in xs:
            cbn(lin(x))
    pooled = lin(torch.cat(xs)).detach()
    torch.testing.assert_close(cbn.last_window.window_mean, pooled.mean(0), **TIGHT)  # weighted by counts
    torch.testing.assert_close(cbn.last_window.window_var, pooled.var(0, unbiased=False), **TIGHT)
    cbn.eval()
    torch.testing.assert_close(cbn(lin(xs[0])), nn.functional.batch_norm(lin(xs[0]), cbn.running_mean,
                               cbn.running_var, cbn.weight, cbn.bias), **TIGHT)


def test_errors_and_repr():
    conv = nn.Conv2d(3, 4, 1)
    cbn = znn.CrossIterationBatchNorm2d(4, window=2)
    x = torch.randn(2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"call \.attach\(layer\)"):
        cbn(conv(x))
    cbn.attach(conv)
    assert "window=2" in repr(cbn) and "layer=Conv2d" in repr(cbn)
    with pytest.raises(ValueError, match="not the latest output of the attached Conv2d"):
        cbn(conv(x).relu())
    with pytest.raises(ValueError, match="4 output channels"):
        znn.CrossIterationBatchNorm2d(5).attach(conv)
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv1d or nn.Conv2d"):
        cbn.attach(nn.ReLU())
    with pytest.raises(ValueError, match="window must be a positive int"):
        znn.CrossIterationBatchNorm2d(4, window=0)
    cbn.attach(None)
    assert cbn.layer is None and not conv._forward_hooks


def test_saved_for_backward_is_the_input_plus_small_statistics():
    from test_core_memory import saved_bytes

    conv = nn.Conv2d(4, 16, 1)
    m = znn.CrossIterationBatchNorm2d(16, window=3).attach(conv)
    x = torch.randn(8, 4, 12, 12, requires_grad=True)
    for _ in range(3):  # fill the window: the stored iterations add no saved tensor
        m(conv(x))
    assert float(m.window_count.min()) > 0
    h_bytes = 8 * 16 * 12 * 12 * 4
    # the conv saves its input x, the CBN layer its input h, plus O(N C) statistics
    assert saved_bytes(nn.Sequential(conv, m), x) <= x.numel() * 4 + h_bytes + 8 * 16 * 8


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_window_equals_tensor_operations(compensate, dtype, monkeypatch):
    """The window's merge and record in C (normzoo.native_window) give what the tensor operations give: outputs,
    gradients, running statistics, the window buffers and last_window, over steps that wrap around the ring;
    with unequal batch sizes, and for float32, float64 and bfloat16 models."""
    from normzoo import native, native_window

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    gen = torch.Generator().manual_seed(21)
    xs = [torch.randn(n, 3, 5, 4, generator=gen).to(dtype) * 2 + 1 for n in (6, 4, 6, 5, 6, 3, 6)]
    gs = [torch.randn(x.shape[0], 4, 5, 4, generator=gen).to(dtype) for x in xs]

    def run():
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3, padding=1).to(dtype)
        cbn = znn.CrossIterationBatchNorm2d(4, window=3, burn_in=1, compensate=compensate).to(dtype)
        if compensate:
            cbn.attach(conv)
        opt = torch.optim.SGD(list(conv.parameters()) + list(cbn.parameters()), lr=0.05)
        outs = []
        for x, g in zip(xs, gs):
            opt.zero_grad()
            y = cbn(conv(x))
            y.backward(g)
            w = cbn.last_window
            outs += [y.detach(), cbn.weight.grad.clone(), conv.weight.grad.clone()]
            outs += [] if w is None else [w.count, w.mean, w.var, w.raw_mean, w.raw_var, w.window_mean, w.window_var]
            opt.step()
        return outs + [cbn.running_mean, cbn.running_var, cbn.window_count, cbn.window_mean, cbn.window_var]

    got = run()
    monkeypatch.setattr(native_window, "merge", lambda *args: None)
    monkeypatch.setattr(native_window, "record", lambda *args, **kwargs: None)
    want = run()
    tol = {torch.float64: TIGHT, torch.float32: TOL, torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


def test_last_window_survives_a_dtype_change_before_it_is_read():
    """last_window is built on first access from the buffers and the slot the step overwrote: converting the
    layer in between changes nothing but the dtype."""
    gen = torch.Generator().manual_seed(5)
    cbn = znn.CrossIterationBatchNorm2d(3, window=3, burn_in=0, compensate=False)
    twin = copy.deepcopy(cbn)
    for _ in range(4):
        x = torch.randn(4, 3, 5, 5, generator=gen)
        cbn(x), twin(x)
    want = twin.last_window
    cbn.double()
    got = cbn.last_window
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-7)
