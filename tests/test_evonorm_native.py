"""EvoNorm-S0/B0 native path (C kernels, hand-derived backward) against the formula path (torch operations,
autograd): outputs, all gradients, running variance, layouts, dtypes, gradcheck, saved memory, numerics."""
from __future__ import annotations

import math

import pytest
import torch

from normzoo import native, native_evonorm
from normzoo.nn.evonorm import EvoNormB0, EvoNormS0, evonorm_b0, evonorm_s0

pytestmark = pytest.mark.skipif(not native.supports(torch.zeros(2, 2)), reason="native kernels unavailable")

EPS = 1e-5
TOL = {torch.float32: 2e-5, torch.float64: 1e-11, torch.bfloat16: 3e-2}


@pytest.fixture
def formula(monkeypatch):
    """Within the test, ``formula()`` runs its callable on the formula path (native.supports patched off)."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(native, "supported_layout", lambda x: None)  # (native.supports asks it)
            return fn()

    return run


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x.contiguous()
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.movedim(1, -1).contiguous().movedim(-1, 1)  # (N, C, L) stored as (N, L, C)


def _params(c: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=g) + 0.5).to(dtype)
    bias = (torch.rand(c, generator=g) - 0.5).to(dtype)
    v = (torch.rand(c, generator=g) * 2 - 1).to(dtype)  # both signs: both sides of B0's max are taken
    return weight, bias, v


def _run(call, x: torch.Tensor, params, dy: torch.Tensor):
    """Output and gradients (x, then each parameter given) of ``call(x, *params)`` for upstream ``dy``."""
    x = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    y = call(x, *ps)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in ps]


def _close(got, want, tol: float, what: str = "") -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.double(), b.double()
        scale = max(b.abs().max().item(), 1e-30)
        err = (a - b).abs().max().item() / scale
        assert err <= tol, f"{what} output {i}: relative error {err:.3g} > {tol}"


def _truth(call, x, params, dy):
    """The formula path in float64 on the same values (the reference for bfloat16)."""
    return _run(call, x.double(), [p.double() for p in params], dy.double())


def _check_against_formula(call, x, params, dy, formula, what=""):
    got = _run(call, x, params, dy)
    if x.dtype == torch.bfloat16:
        _close(got, formula(lambda: _truth(call, x, params, dy)), TOL[x.dtype], what)
    else:
        _close(got, formula(lambda: _run(call, x, params, dy)), TOL[x.dtype], what)
    return got


# (2, 40, 5, 7): channels_last rows of 40 channels folded to 80 values (nz_evo_width), the last row shorter;
# (2, 3, 9, 7), (2, 12, 9, 7): rows of 3 and 12 channels folded to 96 values (whole chunks), the last shorter;
# (4, 8, 6), (3, 12, 25): contiguous rows shorter than a chunk (S0's padded to 16 and 32 values)
SHAPES = [(3, 8, 5, 7), (4, 8, 6), (2, 8, 3, 4, 5), (5, 8), (2, 40, 5, 7), (2, 3, 9, 7), (2, 12, 9, 7), (3, 12, 25)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 8])  # (as many as divide the channels)
def test_s0_native_matches_formula(dtype, shape, channels_last, groups, formula):
    torch.manual_seed(0)
    groups = math.gcd(groups, shape[1])
    x = _layout(torch.randn(shape) * 2.0 - 0.3, channels_last).to(dtype)
    dy = torch.randn(shape).to(dtype)
    params = _params(shape[1], dtype, 1)
    got = _check_against_formula(lambda x, w, b, v: evonorm_s0(x, groups, w, b, v, EPS), x, params, dy, formula,
                                 f"s0 {shape}")
    assert got[0].dtype == dtype and got[1].stride() == x.stride()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "batch-eval"])
def test_b0_native_matches_formula(dtype, shape, channels_last, mode, formula):
    torch.manual_seed(2)
    x = _layout(torch.randn(shape) * 2.0 + 0.4, channels_last).to(dtype)
    dy = torch.randn(shape).to(dtype)
    params = _params(shape[1], dtype, 3)
    running = torch.rand(shape[1]) + 0.5
    runs = []

    def call(x, w, b, v):
        rv = None if mode == "batch-eval" else running.clone().to(x.dtype)
        runs.append(rv)
        return evonorm_b0(x, rv, w, b, v, mode == "train", 0.3, EPS)

    _check_against_formula(call, x, params, dy, formula, f"b0 {mode} {shape}")
    if mode == "train":  # the running variance, updated with the unbiased batch variance
        m = x.numel() // shape[1]
        dims = (0,) + tuple(range(2, x.dim()))
        expected = 0.7 * running.double() + 0.3 * x.double().var(dim=dims, unbiased=True) * 1.0
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(runs[0].double(), expected.to(runs[0].dtype).double(), rtol=tol, atol=tol)
        assert m > 1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["b0", "s0"])
def test_bfloat16_results_are_the_float_results_rounded(name, channels_last):
    """bfloat16 input runs the float32 arithmetic on its values; the results are stored rounded to nearest even,
    subnormal ones too (AVX-512-BF16's conversion instruction would flush those to zero): y (and B0's dx) equal the
    float32 kernels' on the same values, rounded by torch, bit for bit, in chunks that mix subnormal and normal
    results (channels_last rows hold every channel). (S0's contiguous dx differs from float32's in the last bit of a
    few values before rounding.)"""
    gen = torch.Generator().manual_seed(8)
    shape = (3, 40, 9, 8)
    x = (torch.randn(shape, generator=gen) * 2.0).to(torch.bfloat16)
    dy = torch.randn(shape, generator=gen).to(torch.bfloat16)
    w = torch.ones(40)
    w[::3] = 2.0 ** -128  # subnormal results of every third channel, beside normal ones
    b, v = torch.zeros(40), torch.rand(40, generator=gen)
    x, dy = _layout(x, channels_last), _layout(dy, channels_last)

    def run(x, dy):
        x = x.detach().requires_grad_()
        if name == "b0":
            y = evonorm_b0(x, torch.ones(40), w, b, v, False, 0.1, EPS)
        else:
            y = evonorm_s0(x, 4, w, b, v, EPS)
        (dx,) = torch.autograd.grad(y, x, dy)
        return y.detach(), dx

    got, want = run(x, dy), run(x.float(), dy.float())
    assert (want[0].abs() < torch.finfo(torch.float32).tiny).sum() > 100 and (want[0].abs() > 1e-3).sum() > 100
    for a, r in zip(got, want) if name == "b0" or channels_last else zip(got[:1], want[:1]):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.view(torch.int16), r.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("kind", ["float32", "float64", "bfloat16", "float16", "strided"])
def test_b0_running_variance_in_any_buffer(kind, compiled, formula):
    """The running variance is updated (training) and read (eval) in its own dtype: by the kernel where it takes the
    buffer (contiguous float32, float64, bfloat16), otherwise by a tensor update after it (float16, a strided
    view); on both autograd paths, as the formula path does it."""
    from normzoo import native_ops

    torch.manual_seed(5)
    x = torch.randn(4, 6, 5, 5) * 2.0 + 0.5
    params = _params(6, torch.float32, 6)

    def buffer():
        if kind == "strided":
            return (torch.rand(12, generator=torch.Generator().manual_seed(1)) + 0.5)[::2]
        return (torch.rand(6, generator=torch.Generator().manual_seed(1)) + 0.5).to(getattr(torch, kind))

    old = native_ops.use_compiled(compiled)
    try:
        ours, theirs = buffer(), buffer()
        y = evonorm_b0(x, ours, *params, True, 0.3, EPS)
        torch.testing.assert_close(y, formula(lambda: evonorm_b0(x, theirs, *params, True, 0.3, EPS)))
        tol = 1e-2 if kind in ("bfloat16", "float16") else 1e-6
        assert ours.dtype == theirs.dtype and not torch.equal(ours, buffer())
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=tol, atol=tol)
        y = evonorm_b0(x, ours, *params, False, 0.3, EPS)  # eval: the running variance read
        torch.testing.assert_close(y, formula(lambda: evonorm_b0(x, ours, *params, False, 0.3, EPS)))
    finally:
        native_ops.use_compiled(old)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_b0_module_native_matches_formula(channels_last, momentum, track, formula):
    torch.manual_seed(4)
    make = lambda: EvoNormB0(8, momentum=momentum, track_running_stats=track)  # noqa: E731
    ours, theirs = make(), make()
    xs = [_layout(torch.randn(4, 8, 5, 5) * s + 1.0, channels_last) for s in (1.0, 2.5)]
    for x in xs:  # two training steps, then eval
        torch.testing.assert_close(ours(x), formula(lambda: theirs(x)))
    if track:
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert ours.num_batches_tracked.item() == 2
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(xs[0]), formula(lambda: theirs(xs[0])))


def test_native_path_is_taken_and_fallback_for_float16():
    from normzoo import native_ops

    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    native_s0, native_b0 = (("_S0NativeBackward", "_B0NativeBackward") if native_ops.ops() is None else
                            ("torch::autograd::CppNode<(anonymous namespace)::S0Op>",
                             "torch::autograd::CppNode<(anonymous namespace)::B0Op>"))  # the compiled operators
    assert evonorm_s0(x, 4).grad_fn.name() == native_s0
    assert evonorm_b0(x, None, training=True).grad_fn.name() == native_b0
    half = torch.randn(2, 8, 4, 4).half().requires_grad_()  # float16: not native, the formula path
    assert type(evonorm_s0(half, 4).grad_fn).__name__ == "_RematerializeBackward"
    strided = torch.randn(2, 8, 4, 8)[..., ::2].requires_grad_()  # neither layout
    assert type(evonorm_b0(strided, None, training=True).grad_fn).__name__ == "_RematerializeBackward"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("compiled", [False, True], ids=["python-op", "compiled-op"])
def test_gradcheck_native_float64(channels_last, compiled, monkeypatch):
    from normzoo import native_ops

    if compiled and native_ops.ops() is None:
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    monkeypatch.setattr(native_ops, "_enabled", compiled)
    torch.manual_seed(5)
    x = _layout(torch.randn(3, 4, 3, 3, dtype=torch.float64), channels_last).requires_grad_()
    w, b, v = (p.requires_grad_() for p in _params(4, torch.float64, 6))
    running = torch.rand(4, dtype=torch.float64) + 0.5
    node = evonorm_s0(x, 2, w, b, v).grad_fn.name()  # the native op on either path
    assert node.endswith("::S0Op>") if compiled else node == "_S0NativeBackward"
    assert torch.autograd.gradcheck(lambda x, w, b, v: evonorm_s0(x, 2, w, b, v, 1e-3), (x, w, b, v))
    for training in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, w, b, v: evonorm_b0(x, running.clone(), w, b, v, training, 0.1, 1e-3), (x, w, b, v))


def test_params_absent_and_partial_gradients(formula):
    torch.manual_seed(7)
    x = torch.randn(3, 6, 4, 4)
    dy = torch.randn(3, 6, 4, 4)
    for call in (lambda x, v: evonorm_s0(x, 3, None, None, v), lambda x, v: evonorm_b0(x, None, None, None, v, True)):
        v = torch.linspace(-1, 1, 6)
        _close(_run(call, x, [v], dy), formula(lambda: _run(call, x, [v], dy)), TOL[torch.float32])
    w = torch.rand(6, requires_grad=True)  # only a parameter wants a gradient
    evonorm_s0(x, 3, w, None, None).backward(dy)
    w2 = w.detach().clone().requires_grad_()
    formula(lambda: evonorm_s0(x, 3, w2, None, None).backward(dy))
    torch.testing.assert_close(w.grad, w2.grad)


def test_parallel_kernels_match_formula(formula):
    torch.manual_seed(8)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # above native.PARALLEL_THRESHOLD; C = 5 contiguous: B0 in two passes (too few channels per thread)
        for shape, channels_last in [((4, 32, 48, 48), False), ((4, 32, 48, 48), True), ((4, 5, 128, 128), False)]:
            x = _layout(torch.randn(shape), channels_last)
            assert x.numel() >= native.PARALLEL_THRESHOLD
            dy = torch.randn(shape)
            params = _params(shape[1], torch.float32, 9)
            _check_against_formula(lambda x, w, b, v: evonorm_s0(x, shape[1], w, b, v), x, params, dy, formula)
            _check_against_formula(lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True), x, params, dy, formula)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("channels_last", [False, True])
def test_s0_large_blocks_recompute_the_sigmoid(channels_last, formula):
    """Blocks above the kernels' keep limit (1M values: a sample in channels_last, a group otherwise) take the
    path that computes sigmoid(v x) again for dx instead of keeping it."""
    torch.manual_seed(12)
    shape = (1, 4, 520, 520) if channels_last else (1, 4, 730, 730)  # block: 1.08M values / 2 groups of 1.07M
    x = _layout(torch.randn(shape), channels_last)
    dy = torch.randn(shape)
    params = _params(4, torch.float32, 13)
    groups = 2 if channels_last else 1
    _check_against_formula(lambda x, w, b, v: evonorm_s0(x, groups, w, b, v), x, params, dy, formula)


def _saved_bytes(fn, x):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


@pytest.mark.parametrize("channels_last", [False, True])
def test_saved_for_backward_is_the_input_and_statistics(channels_last):
    n, c = 8, 16
    x = _layout(torch.randn(n, c, 12, 12), channels_last).requires_grad_()
    s0 = EvoNormS0(c, groups=4)
    b0 = EvoNormB0(c)
    for m in (s0, b0):
        params = sum(p.numel() * p.element_size() for p in m.parameters())
        saved = _saved_bytes(m, x)
        assert saved <= x.numel() * x.element_size() + params + 4 * n * c * 8, (type(m).__name__, saved)
        assert saved >= x.numel() * x.element_size()  # the input itself is what is kept


@pytest.mark.parametrize("channels_last", [False, True])
def test_ill_conditioned_channels(channels_last):
    """Mean 1e4, std 1e-2 in float32: the variances (and so outputs and gradients) stay right."""
    torch.manual_seed(10)
    x64 = torch.randn(4, 4, 6, 6, dtype=torch.float64) * 1e-2 + 1e4
    x = _layout(x64.float(), channels_last)
    dy = torch.randn(4, 4, 6, 6)
    w, b = torch.ones(4), torch.zeros(4)
    cases = [(lambda x, v: evonorm_s0(x, 2, w.to(x.dtype), b.to(x.dtype), v), torch.zeros(4)),  # x / (2 std)
             (lambda x, v: evonorm_b0(x, None, w.to(x.dtype), b.to(x.dtype), v, True), -torch.ones(4))]  # batch side
    for call, v in cases:
        got = _run(call, x, [v], dy)
        want = _run(call, x.double(), [v.double()], dy.double())  # the same values in float64: the truth
        _close(got, want, 1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_non_finite_input(channels_last, formula):
    x = torch.randn(3, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 3] = float("inf")
    x[2, 3, 4, 4] = -float("inf")
    x = _layout(x, channels_last)
    for call in (lambda x: evonorm_s0(x, 4), lambda x: evonorm_s0(x, 2), lambda x: evonorm_b0(x, None, training=True),
                 lambda x: evonorm_b0(x, torch.ones(4), training=False)):
        got, want = call(x), formula(lambda: call(x))
        assert torch.equal(got.isnan(), want.isnan())
        assert got.isnan().any() and not got.isnan().all()
        torch.testing.assert_close(got[~got.isnan()], want[~want.isnan()])


def test_b0_ties_split_the_gradient_as_torch_maximum(formula):
    """N = 1 and v = 0: sigma_b == sigma_i exactly, every element is a tie; each side gets half the gradient."""
    torch.manual_seed(11)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    dy = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    params = [torch.rand(3, dtype=torch.float64) + 0.5, torch.zeros(3, dtype=torch.float64),
              torch.zeros(3, dtype=torch.float64)]
    call = lambda x, w, b, v: evonorm_b0(x, None, w, b, v, True, 0.1, EPS)  # noqa: E731
    st = native_evonorm.b0_forward(x, *params, EPS, None)[1]
    assert torch.equal(st.sigma_b.expand(1, 3), st.sigma_i)  # the tie is real
    got = _run(call, x, params, dy)
    _close(got, formula(lambda: _run(call, x, params, dy)), 1e-12, "tie")
    # not what either side alone would give: dv = half of sum e x (the instance side's share)
    w = params[0]
    d = st.sigma_b.view(1, 3, 1, 1)
    e = -dy * w.view(1, 3, 1, 1) * x / d ** 2
    torch.testing.assert_close(got[4], 0.5 * (e * x).sum(dim=(0, 2, 3)))


def _ulp_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the float32 spacing at want (want in float64)."""
    spacing = torch.nextafter(want.float(), torch.tensor(math.inf)).double() - want.float().double()
    return (got.double() - want).abs() / spacing.clamp_min(2.0 ** -149)


def test_sigmoid_accuracy():
    z = torch.cat([torch.linspace(-120, 120, 200001), torch.randn(100000) * 4,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 103.9, -103.9, 104.5, -104.5, 1e30, -1e30])])
    want = torch.sigmoid(z.double())
    got = native_evonorm.sigmoid(z)
    assert _ulp_error(got, want).max().item() <= 4.0
    assert torch.equal(got, got.clamp(0.0, 1.0))
    normal = z > -80.0  # (torch's float sigmoid flushes its results below about 1e-38 to 0)
    torch.testing.assert_close(got[normal], torch.sigmoid(z)[normal], rtol=1e-6, atol=0.0)
    special = native_evonorm.sigmoid(torch.tensor([math.inf, -math.inf, math.nan, 200.0, -200.0]))
    assert special[:2].tolist() == [1.0, 0.0] and math.isnan(special[2].item())
    assert special[3].item() == 1.0 and special[4].item() == 0.0
    torch.testing.assert_close(native_evonorm.sigmoid(z.double()), want, rtol=1e-15, atol=0.0)
    bf = z.bfloat16()
    torch.testing.assert_close(native_evonorm.sigmoid(bf), torch.sigmoid(bf.double()).bfloat16(), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("dtype, param_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("kind", ["s0", "b0"])
def test_parameters_reach_the_kernels_in_their_own_dtype(dtype, param_dtype, kind, formula):
    """A bfloat16 (or float64) model's gamma, beta and v go to the kernels as they are, with one type code, and
    their gradients come back in that dtype: the results are the formula's in float64."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(4, 8, 5, 6, generator=gen) * 2 + 0.5).to(dtype)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    params = [p.to(param_dtype) for p in _params(8, torch.float32, 9)]

    def call(x, w, b, v):
        return (evonorm_s0(x, 4, w, b, v, EPS) if kind == "s0"
                else evonorm_b0(x, None, w, b, v, True, 0.1, EPS))

    got = _run(call, x, params, dy)
    assert all(g.dtype == param_dtype for g in got[2:])
    want = formula(lambda: _truth(call, x, params, dy))
    _close(got, want, 3e-2 if torch.bfloat16 in (dtype, param_dtype) else 1e-5, f"{kind} {dtype} {param_dtype}")
