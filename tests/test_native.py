"""The native kernels: built where a C compiler exists, and equal to the PyTorch fallback."""
import shutil

import pytest
import torch

from normzoo import functional as F
from normzoo import native, native_ops


def test_native_kernels_build_where_a_compiler_exists():
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert native.status() == "native"


@pytest.fixture(autouse=True)
def threaded():
    """Split even these small test tensors over two threads, so the per-thread code paths run (in the compiled
    operators too, which keep their own copy of the threshold)."""
    old = native.PARALLEL_THRESHOLD
    native.PARALLEL_THRESHOLD = 1024
    native_ops.rebind()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
    native.PARALLEL_THRESHOLD = old
    native_ops.rebind()


def _openmp_available() -> bool:
    return native.library() is not None and native._openmp_entry()[0] is not None


@pytest.fixture(params=["openmp", "pool"])
def threads_kind(request):
    """Both places a parallel job can run: PyTorch's OpenMP team and normzoo's own pthread pool."""
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    if request.param == "openmp" and not _openmp_available():
        pytest.skip(f"PyTorch's OpenMP is not available here: {native.threads()}")
    old = native.set_threads(request.param)
    yield request.param
    native.set_threads(old)


@pytest.fixture(params=[False, True], ids=["cached", "streaming"])
def streaming(request):
    """Both store paths: ordinary stores, and non-temporal stores (normally for outputs of 8 MiB or more)
    on every output, so that their unaligned heads and tails run on these small tensors."""
    if not request.param:
        yield False
        return
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    old = native.set_stream_min(0)
    yield True
    native.set_stream_min(old)


@pytest.fixture
def fallback(monkeypatch):
    """Run the code under test with the native kernels switched off."""
    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(native, "supported_layout", lambda x: None)  # (native.supports asks it)
            return fn(*args)
    return run


def test_the_fallback_fixture_keeps_every_layer_off_the_kernels(fallback, monkeypatch):
    """What ``fallback`` runs reaches neither the kernels' wrappers nor the compiled operators (which the layers
    reach through native.supported_layout): the comparisons below compare two different paths."""
    calls = []
    real_fn, real_ops = native._fn, native_ops.ops
    monkeypatch.setattr(native, "_fn", lambda *a: calls.append(a) or real_fn(*a))
    monkeypatch.setattr(native_ops, "ops", lambda: calls.append("ops") or real_ops())
    x, w, b, g = _inputs((4, 8, 5, 8), torch.float32, False, seed=3)  # C = D = 8: one w, b for every layer
    for fn in (*LAYERS.values(), *_CORE_WITH_PARAMS.values()):
        fallback(_fwd_bwd, fn, x, w, b, g)
    assert calls == []
    _fwd_bwd(LAYERS["gn"], x, w, b, g)  # and the spies see the native path
    assert calls


LAYERS = {
    "bn": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    "mbn": lambda x, w, b: F.mean_only_batch_norm(x, None, None, w, b, training=True),
    "in": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    "gn": lambda x, w, b: F.group_norm(x, 4, w, b),
    "ln2d": lambda x, w, b: F.layer_norm_2d(x, w, b),
    # clipping active: the data has mean 1.5 and std 2 against running statistics 0 and 1
    "brn": lambda x, w, b: F.batch_renorm(x, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), w, b, training=True,
                                          r_max=1.5, d_max=0.5),
    # eval: fixed statistics (channel_norm.fixed_affine), running ones unlike the data's
    "bn_eval": lambda x, w, b: F.batch_norm(x, *_running(x), w, b, training=False),
    "mbn_eval": lambda x, w, b: F.mean_only_batch_norm(x, _running(x)[0], None, w, b, training=False),
    "in_eval": lambda x, w, b: F.instance_norm(x, *_running(x), w, b, use_input_stats=False),
}


def _running(x):
    """Running mean and variance for x's channels: float32 (C,), -1..2 and 0.5..3."""
    c = x.shape[1]
    return torch.linspace(-1.0, 2.0, c), torch.linspace(0.5, 3.0, c)


def _inputs(shape, dtype, channels_last: bool, seed: int, scale: float = 2.0, shift: float = 1.5):
    """x (scaled and shifted normal values, in ``dtype``, channels_last if asked), float32 w and b, and g."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale + shift).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    g = torch.randn(shape, generator=gen).to(dtype)  # contiguous: also a gradient in the other layout than x
    return x, w, b, g


def _fwd_bwd(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
# channels_last: C = 8 is folded into rows of 64 values (small samples, with a tail of positions) or 256 (without),
# C = 4 into rows of 256 with a tail; C = 60 and 48 are not folded: 60 is column tiles of 32, 16, 8 and 4 channels;
# rows of 48 are whole lines in float32 and float64, so they are streamed with the columns after their last chunk;
# C = 36 is folded into rows of 288 values (8 positions), with 7 positions left over; (11, 704, 5, 5): short rows,
# 88 channels a task (2 threads, 8 tasks) in BatchNorm blocks of 82 and 6, their maps 64 rows at a time;
# InstanceNorm's batches of 64 rows across samples; channels_last C > 256 unfolded; (40, 12, 3, 3): contiguous
# BatchNorm's short rows as one row of C L columns a sample
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (16, 8, 32, 33), (2, 4, 32, 33), (2, 60, 5, 6), (2, 48, 4, 5),
                                   (2, 36, 23, 25), (11, 704, 5, 5), (40, 12, 3, 3)])
def test_native_equals_fallback(name, dtype, channels_last, shape, fallback, streaming):
    x, w, b, g = _inputs(shape, dtype, channels_last, seed=0)
    ours = _fwd_bwd(LAYERS[name], x, w, b, g)
    if dtype == torch.bfloat16:  # the fallback's bfloat16 sums are the less exact: both against float64 math
        ref = fallback(_fwd_bwd, LAYERS[name], *(t.double() for t in (x, w, b, g)))
    else:
        ref = fallback(_fwd_bwd, LAYERS[name], x, w, b, g)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for i, (a, r) in enumerate(zip(ours, ref)):
        t = tol if i < 2 else max(tol, 1e-6)  # w, b (and their gradients) are float32 tensors
        torch.testing.assert_close(a.float(), r.float(), rtol=t, atol=t)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", sorted(set(LAYERS) - {"in"}))  # (InstanceNorm needs more than one position)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 24, 1, 1), (300, 24, 1), (7, 40, 1, 1, 1)])
def test_one_position_runs_as_channels_last_and_equals_fallback(name, dtype, shape, fallback):
    """A contiguous (N, C, 1, ...) is channels_last memory: it takes the channel-vectorized kernels (as rows of
    one value each it ran 12x slower than torch at 4096x512x1), with the same results as the fallback."""
    x, w, b, g = _inputs(shape, dtype, False, seed=5)
    assert x.is_contiguous() and native.layout(x) == 1 and native.layout(torch.randn(4, 3, 2)) == 0
    ours = _fwd_bwd(LAYERS[name], x, w, b, g)
    ref = fallback(_fwd_bwd, LAYERS[name], x, w, b, g)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    for i, (a, r) in enumerate(zip(ours, ref)):
        t = tol if i < 2 else max(tol, 1e-6)
        torch.testing.assert_close(a.float(), r.float(), rtol=t, atol=t)
    assert ours[0].shape == x.shape and ours[0].is_contiguous() and ours[1].is_contiguous()


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("rows", [5, 4096])  # threads split the rows, with per-chunk column sums
# 5, 12: rows shorter than a chunk, taken a block of rows at a time (columns by permutations, by gathers)
@pytest.mark.parametrize("d", [96, 5, 12])
def test_row_kernels_equal_fallback(rms, rows, d, fallback, streaming):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64) + 0.7
    w, b = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    fn = (lambda x, w, b: F.rms_norm(x, d, w, 1e-6)) if rms else (lambda x, w, b: F.layer_norm(x, d, w, b))
    ours = _fwd_bwd(fn, x, w, b, g)
    ref = fallback(_fwd_bwd, fn, x, w, b, g)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# fewer than 16 features (blocks of rows: columns by permutations up to 7, by gathers from 8), fewer than a chunk
# (rows summed a batch at a time), whole chunks, and a tail
@pytest.mark.parametrize("d", [1, 3, 7, 8, 15, 16, 96, 100])
def test_row_kernels_in_storage_types_match_float64(rms, dtype, d, streaming):
    """The float32/bfloat16 row kernels (vector chunks, bfloat16 with gamma and beta in its chunk order; short
    rows a block at a time) against float64 math on the same inputs, with distinct gamma and beta per column so
    any misplaced weight shows."""
    gen = torch.Generator().manual_seed(4)
    rows = 1000 if d < 16 else 37  # several blocks of short rows, split over threads, and a tail of rows
    x = (torch.randn(rows, d, generator=gen) * 1.5 + 0.3).to(dtype)
    w = torch.linspace(0.5, 2.0, d) * torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)
    b = torch.linspace(-1.0, 1.0, d)
    g = torch.randn(rows, d, generator=gen).to(dtype)
    fn = (lambda x, w, b: F.rms_norm(x, d, w, 1e-6)) if rms else (lambda x, w, b: F.layer_norm(x, d, w, b))
    ours = _fwd_bwd(fn, x, w, b, g)
    ref = _fwd_bwd(fn, x.double(), w.double(), b.double(), g.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * max(1.0, float(r.abs().max())))


def test_unsupported_layout_falls_back():
    x = torch.randn(4, 6, 5, 5).transpose(2, 3)  # neither contiguous nor channels_last
    assert native.layout(x) is None and not native.supports(x)
    y = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-4, atol=1e-5)


def test_layout_reads_strides_as_a_channel_last_view_would():
    """``layout`` decides from the strides (no view per call); it must agree with what ``movedim(1, -1)`` shows,
    size-1 dims, slices and permutations included, in every rank the kernels take. A contiguous tensor with one
    position (``(N, C)``, ``(N, C, 1, 1)``) is channels_last: the same memory, run along C."""
    def by_view(t: torch.Tensor):
        if t.is_contiguous():
            return 1 if t.dim() == 2 or t[:, :, ...].flatten(2).shape[2] == 1 else 0
        return 1 if t.dim() >= 3 and t.movedim(1, -1).is_contiguous() else None

    gen = torch.Generator().manual_seed(3)
    seen = set()
    for dim in (2, 3, 4, 5):
        for _ in range(400):
            shape = [int(s) for s in torch.randint(1, 4, (dim,), generator=gen)]
            t = torch.empty(*(2 * s for s in shape)).permute(*torch.randperm(dim, generator=gen).tolist())
            t = t[tuple(slice(0, s, int(k)) for s, k in zip(shape, torch.randint(1, 3, (dim,), generator=gen)))]
            if dim in (3, 4, 5) and bool(torch.randint(0, 3, (1,), generator=gen) == 0):
                t = t.movedim(1, -1).contiguous().movedim(-1, 1)
            assert native.layout(t) == by_view(t), (t.shape, t.stride())
            seen.add((dim, by_view(t)))
    assert {(d, k) for d in (3, 4, 5) for k in (0, 1, None)} <= seen  # every case was met


def test_bfloat16_rounding_is_to_nearest_even_and_keeps_nan():
    x = torch.tensor([[1.0, float("nan"), -3.0, 2.5]], dtype=torch.bfloat16).view(1, 1, 4).expand(2, 1, 4).contiguous()
    y = native.affine(x, torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    assert torch.isnan(y[0, 0, 1]) and torch.equal(y[:, :, [0, 2, 3]], x[:, :, [0, 2, 3]])


@pytest.mark.parametrize("length", [64, 77])  # whole vector chunks, and chunks with an element-wise tail
def test_bfloat16_chunk_stores_round_ties_to_even_like_torch(length):
    """x * (1 + 2^-8) lands exactly halfway between two bfloat16 values for most x: the vector stores must round
    those ties to even, keep NaN a NaN and infinities infinite, exactly as torch's float -> bfloat16."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, length, generator=gen).to(torch.bfloat16)
    x[0, 0, 5], x[1, 2, 20], x[0, 1, 33] = float("nan"), float("inf"), float("-inf")
    a = torch.full((2, 3), 1.0 + 2.0 ** -8, dtype=torch.float64)
    y = native.affine(x, a, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    want = (x.float() * (1.0 + 2.0 ** -8)).to(torch.bfloat16)
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.equal(y[finite].view(torch.int16), want[finite].view(torch.int16))


@pytest.mark.parametrize("length", [64, 77])
def test_bfloat16_stores_keep_subnormal_results_like_torch(length):
    """Results below float's smallest normal number round to bfloat16's subnormals as torch rounds them, in
    chunks that also hold normal values (AVX-512-BF16's conversion would flush them to zero)."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, length, generator=gen) * 2.0 ** -118).to(torch.bfloat16)
    x[:, :, ::7] = 1.5  # normal results beside the subnormal ones
    a = torch.full((2, 3), 2.0 ** -9, dtype=torch.float64)
    y = native.affine(x, a, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    want = (x.float() * 2.0 ** -9).to(torch.bfloat16)
    assert (want.float().abs() < torch.finfo(torch.float32).tiny).sum() > 50  # subnormal results are there
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))


def _bn_in_child(x, want, queue) -> None:
    # only normzoo's kernels and NumPy run here: torch's own OpenMP pool hangs in a forked child
    torch.set_num_threads(2)
    y = F.batch_norm(x, None, None, training=True)
    queue.put(float(abs(y.numpy() - want.numpy()).max()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_worker_pool_survives_fork(threads_kind):
    """The kernels' worker threads (the pool's, or OpenMP's team, which hangs after fork) do not exist in a
    forked child: it must start its own pool, not hang."""
    import multiprocessing as mp

    x = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    want = torch.nn.functional.batch_norm(x, None, None, training=True)
    F.batch_norm(x, None, None, training=True)  # the parent's workers are running
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_bn_in_child, args=(x, want, queue))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung in a native kernel")
    assert proc.exitcode == 0 and queue.get(timeout=5) < 1e-4


def test_concurrent_callers_share_the_pool():
    """Python threads calling kernels at once (ctypes releases the GIL): one owns the pool, the others run
    alone; every result is right."""
    import threading

    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(32, 8, 40, 40, generator=gen) * (i + 1) for i in range(6)]
    want = [torch.nn.functional.group_norm(x, 4) for x in xs]
    got = [None] * len(xs)

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = F.group_norm(xs[i], 4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("momentum", [0.1, 0.7, 1.0])  # lerp's two branches (weight below and above 0.5)
@pytest.mark.parametrize("buffers", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["standard", "mean"])
def test_batch_forward_updates_running_statistics_as_lerp(momentum, buffers, mode):
    """BatchNorm's kernel updates the running statistics in the same call, as ``update_running_stats`` does."""
    from normzoo.running import update_running_stats
    from normzoo.stats import Moments

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, 7, 3, generator=gen) * 3 + 1
    start_mean, start_var = torch.randn(5, generator=gen).to(buffers), torch.rand(5, generator=gen).to(buffers) + 0.5
    rm, rv = start_mean.clone(), start_var.clone()
    _, (mean, m2, _) = native.batch_forward(x, None, None, 1e-5, mode, rm, rv, momentum)
    want_mean, want_var = start_mean.clone(), start_var.clone()
    update_running_stats(want_mean, want_var, Moments(6 * 7 * 3, mean, m2), momentum)
    torch.testing.assert_close(rm, want_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, want_var, rtol=1e-6, atol=1e-7)
    only_mean = start_mean.clone()  # one buffer alone
    native.batch_forward(x, None, None, 1e-5, mode, only_mean, None, momentum)
    torch.testing.assert_close(only_mean, want_mean, rtol=1e-6, atol=1e-7)


def test_mean_only_batch_of_one_value_per_channel_tracks_zero_variance():
    """One element per channel (allowed by mean-only BN): the running variance moves towards 0, as in Python."""
    rm, rv = torch.zeros(4), torch.ones(4)
    x = torch.randn(1, 4)
    F.mean_only_batch_norm(x, rm, rv, training=True, momentum=0.5)
    torch.testing.assert_close(rm, 0.5 * x[0])
    torch.testing.assert_close(rv, torch.full((4,), 0.5))


def test_running_statistics_the_kernel_cannot_take_update_in_python():
    """float16 buffers, or buffers of two dtypes, are not the kernel's to update: the Python rule does it."""
    x = torch.randn(8, 3, 4, 4)
    for rm, rv in ((torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)),
                   (torch.zeros(3), torch.ones(3, dtype=torch.float64))):
        assert not native.running_update_applies(rm, rv)
        F.batch_norm(x, rm, rv, training=True, momentum=1.0)
        torch.testing.assert_close(rm.float(), x.mean((0, 2, 3)), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(rv.float(), x.var((0, 2, 3)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layer", ["rows", "bn", "gn"])
def test_threaded_results_are_the_same_every_run(layer, threads_kind):
    """The threads take chunks of the work dynamically, but each chunk's partial sums have fixed bounds and
    are combined in a fixed order: repeated runs give bit-identical results, the same on OpenMP's team as on
    the pool."""
    gen = torch.Generator().manual_seed(6)
    if layer == "rows":
        x, w = torch.randn(4099, 72, generator=gen), torch.randn(72, generator=gen)
        fn = lambda x, w, b: F.layer_norm(x, 72, w, b)  # noqa: E731
    else:
        x, w = torch.randn(7, 12, 19, 17, generator=gen), torch.randn(12, generator=gen)
        fn = (lambda x, w, b: F.batch_norm(x, None, None, w, b, True)) if layer == "bn" else (  # noqa: E731
            lambda x, w, b: F.group_norm(x, 3, w, b))
    g = torch.randn(x.shape, generator=gen)
    first = _fwd_bwd(fn, x, w, w, g)
    for kind in (threads_kind, "pool", threads_kind):
        native.set_threads(kind)
        for _ in range(3):
            for a, b in zip(_fwd_bwd(fn, x, w, w, g), first):
                assert (a is None and b is None) or torch.equal(a, b)


def test_switching_threads_while_kernels_run():
    """set_threads may be called while other threads are inside kernels: each job reads where to run once."""
    import threading

    if not _openmp_available():
        pytest.skip(f"PyTorch's OpenMP is not available here: {native.threads()}")
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(8, 16, 24, 24, generator=gen) + i for i in range(3)]
    want = [torch.nn.functional.group_norm(x, 4) for x in xs]
    failures: list = []
    stop = threading.Event()

    def work(i: int) -> None:
        while not stop.is_set():
            got = F.group_norm(xs[i], 4)
            if not torch.allclose(got, want[i], rtol=1e-4, atol=1e-4):
                failures.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    old = native.threads().split()[0]
    for t in workers:
        t.start()
    try:
        for k in range(60):
            native.set_threads("pool" if k % 2 else "openmp")
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=60)
        native.set_threads(old)
    assert not any(t.is_alive() for t in workers) and not failures


def test_set_threads_refuses_an_unknown_kind():
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    with pytest.raises(ValueError, match="'openmp' or 'pool', got 'tbb'"):
        native.set_threads("tbb")


@pytest.mark.parametrize("env, want", [
    ({}, "openmp ("),  # PyTorch's team: two pools on the same cores fight
    ({"OMP_WAIT_POLICY": "passive"}, "pool (OMP_WAIT_POLICY=PASSIVE"),  # the team sleeps between regions
    ({"NORMZOO_THREADS": "pool"}, "pool (NORMZOO_THREADS=pool)"),
    ({"OMP_WAIT_POLICY": "PASSIVE", "NORMZOO_THREADS": "openmp"}, "openmp ("),
])
def test_where_jobs_run_is_chosen_at_load(env, want):
    import os
    import subprocess
    import sys

    if not _openmp_available():
        pytest.skip(f"PyTorch's OpenMP is not available here: {native.threads()}")
    code = "from normzoo import native; print(native.threads())"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NORMZOO_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().startswith(want), out.stdout + out.stderr


def test_kernels_are_called_through_compiled_entry_points_where_python_headers_exist():
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    if native._python_include() is None:
        assert native.entry_points().startswith("ctypes (Python's C headers")
        return
    assert native.entry_points() == "compiled"
    assert type(native._fn("batch_forward", torch.float32)).__name__ == "builtin_function_or_method"


def test_entry_points_take_and_refuse_what_ctypes_does():
    """The compiled entry point and the ctypes function of a kernel give the same results from the same arguments
    (a NULL pointer as None, a Python int for an int64), and a wrong count or type of argument is a TypeError."""
    if native.entry_points() != "compiled":
        pytest.skip(f"no compiled entry points: {native.entry_points()}")
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    outs = []
    for fn in (native._fn("moments", torch.float64), native.library().nz_moments_f64):
        mean, m2 = torch.empty(3, 5, dtype=torch.float64), torch.empty(3, 5, dtype=torch.float64)
        assert fn(x.data_ptr(), 3, 5, 7, 0, mean.data_ptr(), m2.data_ptr(), 1) is None
        outs.append((mean, m2))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][0], x.mean(2))
    fn = native._fn("moments", torch.float64)
    with pytest.raises(TypeError, match="nz_moments_f64: expected 8 arguments, got 7"):
        fn(x.data_ptr(), 3, 5, 7, 0, None, None)
    with pytest.raises(TypeError):
        fn(x.data_ptr(), 3.0, 5, 7, 0, None, None, 1)  # a float for an int64, as ctypes refuses it
    merge = native.entry("nz_window_merge", signatures={"nz_window_merge": ([native._I64] * 2 + [native._I]
                                                                            + [native._P] * 5, native._D)})
    count, mean, var = torch.tensor([4.0, 6.0]), torch.zeros(2, 3), torch.ones(2, 3)
    out = torch.empty(2, 3, dtype=torch.float64)
    total = merge(2, 3, native._RUNNING_TYPES[torch.float32], count.data_ptr(), mean.data_ptr(), var.data_ptr(),
                  out.data_ptr(), out.data_ptr() + 24)
    assert isinstance(total, float) and total == 10.0  # a double result comes back as a float


def test_layers_run_through_ctypes_without_the_entry_points(run_snippet):
    """NORMZOO_ENTRY_POINTS=0 (as where Python's C headers are missing): the kernels are built without the entry
    points and called through ctypes, with the same results."""
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    code = (
        "import torch, normzoo\n"
        "from normzoo import native\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4, 6, 5, 5, requires_grad=True)\n"
        "m = normzoo.create('bn2d', 6)\n"
        "y = m(x); y.backward(torch.ones_like(y))\n"
        "print(native.entry_points(), type(native._fn('batch_forward', torch.float32)).__name__)\n"
        "print(repr(float(y.square().sum())), repr(float(x.grad.abs().sum())))\n"
    )
    runs = {flag: run_snippet(code, {"NORMZOO_ENTRY_POINTS": flag}) for flag in ("0", "1")}
    assert runs["0"][0] == "ctypes (disabled by NORMZOO_ENTRY_POINTS=0) _FuncPtr"
    assert runs["0"][1] == runs["1"][1]


def test_wake_workers_wakes_the_sleeping_pool():
    """A layer wakes the pool as its Python code begins: a sleeping worker comes out of its wait."""
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    old = native.set_threads("pool")
    try:
        _wake_workers_wakes_the_sleeping_pool()
    finally:
        native.set_threads(old)


def _wake_workers_wakes_the_sleeping_pool():
    import time

    x = torch.randn(4, 8, 64, 64, generator=torch.Generator().manual_seed(11))
    F.group_norm(x, 4)  # the pool exists
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # idle workers asleep, and no wake-up still in flight: the state holds
        before = native.pool_state()
        time.sleep(0.05)
        if native.pool_state() == before and before[0] > 0:
            break
    asleep, wakeups = native.pool_state()
    assert asleep > 0, "no worker went to sleep within 10 s of the last kernel"
    native.wake_workers(torch.randn(2, 3))  # too small to be split over threads: wakes nobody
    time.sleep(0.05)
    assert native.pool_state()[1] == wakeups, "a tensor too small for threads woke the pool"
    native.wake_workers(x)
    while native.pool_state()[1] == wakeups and time.monotonic() < deadline + 10:
        time.sleep(0.001)
    assert native.pool_state()[1] > wakeups, "wake_workers did not wake a sleeping worker"
    torch.testing.assert_close(F.group_norm(x, 4), torch.nn.functional.group_norm(x, 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("buffers", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("limits", [(1.5, 0.5), (float("inf"), float("inf")), (1.0, 0.0)])
def test_batch_renorm_kernel_corrections_and_running_statistics_equal_fallback(buffers, limits, fallback):
    """The native Batch Renorm computes r and d from the running statistics before updating them, as the
    paper's Algorithm 1 and the PyTorch-operations path do."""
    from normzoo.nn.renorm import _batch_renorm

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, 9, 4, generator=gen, dtype=torch.float64) * 2 + 1.5
    w, b = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    start = (torch.randn(5, generator=gen).to(buffers), (torch.rand(5, generator=gen) + 0.5).to(buffers))

    def run():
        rm, rv = start[0].clone(), start[1].clone()
        y, rd = _batch_renorm("t", x, rm, rv, w, b, True, 0.3, 1e-5, *limits)
        return y, rd[-2], rd[-1], rm, rv

    for a, ref in zip(run(), fallback(run)):
        torch.testing.assert_close(a, ref.to(a.dtype), rtol=1e-6, atol=1e-7)


def _switchable(x, w, b, rm, rv, training, gen):
    ml, vl = (torch.randn(3, generator=gen).requires_grad_() for _ in range(2))
    return F.switchable_norm(x, ml, vl, rm, rv, w, b, training=training), [ml, vl]


def _batch_instance(x, w, b, rm, rv, training, gen):
    rho = (torch.rand(x.shape[1], generator=gen) * 1.4 - 0.2).requires_grad_()  # some gates outside [0, 1]
    return F.batch_instance_norm(x, rho, rm, rv, w, b, training=training), [rho]


@pytest.mark.parametrize("method", [_switchable, _batch_instance], ids=["switchable", "batch_instance"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
# (1, 6, 32, 33): one sample, whose channels_last per-(n, c) moments and sums go in pieces over the threads;
# (2, 16, 8, 9): contiguous Batch-Instance Norm a channel at a time on two threads (on one: (5, 6, 7, 3));
# (2, 36, 23, 25): channels_last rows of 36 channels folded to 288 values; (11, 704, 5, 5): more than 8 samples
# (Switchable Norm merges 8 at a time), Batch-Instance Norm's blocks of 82 and 6 channels a task, their maps 64
# rows at a time; (40, 12, 3, 3): contiguous short rows, Batch-Instance Norm's whole-tensor passes
@pytest.mark.parametrize("shape", [(5, 6, 7, 3), (1, 6, 32, 33), (2, 16, 8, 9), (2, 36, 23, 25), (11, 704, 5, 5),
                                   (40, 12, 3, 3)])
def test_mixture_norms_native_algebra_equals_fallback(method, training, dtype, channels_last, shape, fallback):
    """Switchable Norm's and Batch-Instance Norm's O(N C) algebra in C equals the PyTorch-operations path:
    output, the gradients of the input, the affine parameters and the mixing parameters (logits, gate), and
    the running statistics."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=gen) * 2 + 1.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    start = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5)
    if dtype == torch.bfloat16:  # a model moved to bfloat16 has bfloat16 buffers
        start = tuple(t.to(dtype) for t in start)

    def run(x, g):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        rm, rv = start[0].clone(), start[1].clone()
        y, extra = method(*leaves, rm, rv, training, torch.Generator().manual_seed(9))
        y.backward(g)
        return [y.detach()] + [t.grad for t in leaves + extra] + [rm, rv]

    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    # bfloat16: against the fallback in float64 on the same values; its own bfloat16 intermediates are the less
    # exact (the gate's gradient at (2, 36, 15, 19) off by 0.3, the kernels' by 2e-5)
    ref = fallback(run, x.double(), g.double()) if dtype == torch.bfloat16 else fallback(run, x, g)
    for i, (a, r) in enumerate(zip(run(x, g), ref)):
        t = tol if i < 2 else max(tol, 1e-5)  # the parameters and buffers are float32
        torch.testing.assert_close(a.float(), r.float(), rtol=t, atol=t)


@pytest.mark.parametrize("method", ["switchable", "batch_instance"])
@pytest.mark.parametrize("dtype, params", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64),
                                           (torch.float64, torch.float32), (torch.float32, None)])
def test_mixture_norms_take_parameters_of_any_dtype(method, dtype, params, fallback):
    """The native mixture norms read the parameters in their own dtype (a model moved to bfloat16, float64
    parameters on float32 data) or without the affine ones, and return each gradient in its parameter's dtype,
    equal to the PyTorch-operations path's."""
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(4, 5, 6, 3, generator=gen) * 2 - 1).to(dtype)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    mixing = [torch.randn(3, generator=gen), torch.randn(3, generator=gen)] if method == "switchable" else [
        torch.rand(5, generator=gen) * 1.4 - 0.2]
    affine = [] if params is None else [torch.randn(5, generator=gen), torch.randn(5, generator=gen)]

    def run():
        leaves = [x.detach().clone().requires_grad_()] + [t.to(params or torch.float32).requires_grad_()
                                                          for t in mixing + affine]
        w, b = leaves[-2:] if params is not None else (None, None)
        if method == "switchable":
            y = F.switchable_norm(leaves[0], leaves[1], leaves[2], weight=w, bias=b, training=True)
        else:
            y = F.batch_instance_norm(leaves[0], leaves[1], weight=w, bias=b, training=True)
        y.backward(g)
        return [y.detach()] + [t.grad for t in leaves]

    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    got, want = run(), fallback(run)
    for a, r in zip(got, want):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    assert all(t.dtype == (params or torch.float32) for t in got[2:])


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cross_iteration_bn_merged_kernel_equals_fallback(compensate, channels_last, fallback):
    """Cross-Iteration BN on BatchNorm's native kernel (the window's moments merged in per channel, backward
    with the merged count) equals the PyTorch-operations path over several training steps: outputs,
    gradients, running statistics and the window's state."""
    import normzoo

    gen = torch.Generator().manual_seed(10)
    xs = [torch.randn(6, 3, 9, 8, generator=gen) * 2 + 1 for _ in range(6)]
    gs = [torch.randn(6, 5, 9, 8, generator=gen) for _ in range(6)]

    def run():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        cbn = normzoo.create("cbn2d", 5, window=3, compensate=compensate)
        if compensate:
            cbn.attach(conv)
        opt = torch.optim.SGD(list(conv.parameters()) + list(cbn.parameters()), lr=0.05)
        outs = []
        for x, g in zip(xs, gs):
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            opt.zero_grad()
            y = cbn(conv(x))
            y.backward(g)
            outs += [y.detach(), cbn.weight.grad.clone(), conv.weight.grad.clone()]
            opt.step()
        return outs + [cbn.running_mean, cbn.running_var, cbn.window_mean, cbn.window_var]

    for a, r in zip(run(), fallback(run)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


# -- Filter Response Normalization: InstanceNorm's fused kernel in RMS mode, with the TLU inside ----------
def _frn_fwd_bwd(x, w, b, tau, eps, g):
    from normzoo.nn.response import filter_response_norm

    ins = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, tau, eps)]
    y = filter_response_norm(*ins)
    y.backward(g)
    return [y.detach()] + [t.grad if t is not None else None for t in ins]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
# channels_last: C = 8 folded into rows of 64 values, C = 40 not; the 3-D input is (N, C, L)
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (2, 40, 5, 6), (4, 8, 9)])
@pytest.mark.parametrize("parts", ["affine+tlu", "tlu", "affine", "none"])
def test_frn_native_equals_fallback(dtype, channels_last, shape, parts, fallback, streaming):
    gen = torch.Generator().manual_seed(4)
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.3).to(dtype)
    x[0, :, 0] = 0  # zeros: with beta = tau = 0 these tie with the threshold
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen) * 0.5
    b[:2] = 0
    tau = torch.randn(c, generator=gen) * 0.5
    tau[:2] = 0
    eps = torch.tensor(0.3)  # a learned eps: its gradient too
    w, b = (w, b) if "affine" in parts else (None, None)
    tau = tau if "tlu" in parts else None
    g = torch.randn(shape, generator=gen).to(dtype)
    ours = _frn_fwd_bwd(x, w, b, tau, eps, g)
    args = [t.double() if t is not None and dtype == torch.bfloat16 else t for t in (x, w, b, tau, eps, g)]
    ref = fallback(_frn_fwd_bwd, *args)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for i, (a, r) in enumerate(zip(ours, ref)):
        if r is None:
            assert a is None
            continue
        t = tol if i < 2 else max(tol, 1e-5)
        torch.testing.assert_close(a.double(), r.double(), rtol=t, atol=t * max(1.0, float(r.abs().max())))
    assert ours[0].stride() == x.stride() and ours[1].stride() == x.stride()


@pytest.mark.parametrize("dtype, param_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frn_parameters_reach_the_kernels_in_their_own_dtype(dtype, param_dtype, channels_last, fallback):
    """A bfloat16 (or float64) model's gamma, beta and tau go to the kernels as they are, typed, and their gradients
    come back in that dtype: the results are the fallback's (in float64)."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 8, 5, 7, generator=gen) * 2 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, tau = ((torch.rand(8, generator=gen) + 0.5), torch.randn(8, generator=gen) * 0.5,
                 torch.randn(8, generator=gen) * 0.5)
    w, b, tau = (t.to(param_dtype) for t in (w, b, tau))
    g = torch.randn(x.shape, generator=gen).to(dtype)
    ours = _frn_fwd_bwd(x, w, b, tau, torch.tensor(0.3), g)
    assert all(t.dtype == param_dtype for t in ours[2:5])
    ref = fallback(_frn_fwd_bwd, *(t.double() for t in (x, w, b, tau, torch.tensor(0.3), g)))
    tol = 5e-2 if torch.bfloat16 in (dtype, param_dtype) else 1e-4
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * max(1.0, float(r.abs().max())))


@pytest.mark.parametrize("compiled", [False, True], ids=["python-op", "compiled-op"])
def test_frn_native_is_used_and_passes_gradcheck(monkeypatch, compiled):
    from normzoo.nn.response import filter_response_norm

    if compiled and native_ops.ops() is None:
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    monkeypatch.setattr(native_ops, "_enabled", compiled)
    calls = []
    forward = native.group_forward
    monkeypatch.setattr(native, "group_forward", lambda *a: calls.append(a[-1]) or forward(*a))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w, b, tau = (torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    eps = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(filter_response_norm, (x, w, b, tau, eps))
    if compiled:  # the compiled operator, which calls the kernel itself
        assert filter_response_norm(x, w, b, tau, eps).grad_fn.name().endswith("::FrnOp>")
    else:
        assert calls and calls[0] is not None  # the native kernel ran, with the TLU's threshold


def test_frn_ties_pass_the_gradient_to_the_normalized_value():
    """y == tau (a zero input, beta = tau = 0): dz goes to y, none to tau (tf.maximum's rule)."""
    from normzoo.nn.response import filter_response_norm

    x = torch.randn(2, 3, 4, 4)
    x[:, :, :2] = 0
    x.requires_grad_()
    tau = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    y = filter_response_norm(x, torch.ones(3), b, tau, 1e-3)
    y.backward(torch.ones_like(y))
    above = (x.detach() > 0) | (x.detach() == 0)
    torch.testing.assert_close(tau.grad, (~above).sum((0, 2, 3)).float())
    torch.testing.assert_close(b.grad, above.sum((0, 2, 3)).float())


def test_frn_nan_input_stays_nan():
    from normzoo.nn.response import filter_response_norm

    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 1, 1] = float("nan")
    y = filter_response_norm(x, None, None, torch.zeros(3), 1e-3)
    assert torch.isnan(y[1, 2]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[1, :2]).any()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["bn", "in", "gn", "ln2d"])
def test_nan_input_gives_nan_statistics_not_zero_variance(name, channels_last):
    """A NaN in the data makes its channel's statistics NaN (as torch's), never a variance clamped to 0: for
    BatchNorm the running variance must not quietly decay toward 0."""
    x = torch.randn(4, 8, 6, 6)
    x[1, 2, 3, 3] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if name == "bn":
        from normzoo.nn import BatchNorm2d

        ours, ref = BatchNorm2d(8), torch.nn.BatchNorm2d(8)
        y, want = ours(x), ref(x)
        assert torch.equal(torch.isnan(ours.running_var), torch.isnan(ref.running_var))
        assert torch.isnan(ours.running_var[2]) and torch.isnan(ours.running_mean[2])
    else:
        mean, m2 = native.moments(x)
        assert torch.isnan(m2[1, 2]) and torch.isfinite(m2[0]).all() and torch.isfinite(m2[1, 3:]).all()
        groups = {"gn": 4, "ln2d": 1}.get(name)
        y = F.instance_norm(x) if name == "in" else F.group_norm(x, groups)
        want = torch.nn.functional.instance_norm(x) if name == "in" else torch.nn.functional.group_norm(x, groups)
    assert torch.equal(torch.isnan(y), torch.isnan(want))


def test_declared_sets_argtypes_once_per_library_and_needs_the_kernels(monkeypatch):
    import ctypes

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signature = [P, I64, I64, I64, I, P, P, I]  # nz_moments' own: declaring it again changes nothing
    lib = native.declared({"nz_moments_{suf}": signature})
    assert lib is native.library()
    for suf in ("f32", "f64", "bf16"):
        fn = getattr(lib, f"nz_moments_{suf}")
        assert fn.restype is None and list(fn.argtypes) == signature
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(native.moments(x)[0], x.double().mean(2))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_loaded", True)
    with pytest.raises(RuntimeError, match="unavailable"):
        native.declared({"nz_moments_{suf}": []})


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_statistics_stay_exact_far_from_zero(channels_last, groups, dtype):
    """Data at 1e4 with a spread of 1e-2 (and channel offsets): the shifted sums keep the variance exact in
    both layouts, also where a channels_last sample is one contiguous block (one group)."""
    gen = torch.Generator().manual_seed(3)
    x = 1e4 + torch.randn(4, 8, 9, 11, generator=gen, dtype=torch.float64) * 1e-2
    x = x + torch.arange(8, dtype=torch.float64).view(1, 8, 1, 1) * 1e-2
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = F.group_norm(x, groups, None, None, eps=1e-12)
    # two-pass float64 reference (torch's own channels_last GroupNorm uses E[x^2] - E[x]^2 and is off by 1e-3 here)
    xg = x.double().contiguous().view(4, groups, -1)
    centred = xg - xg.mean(-1, keepdim=True)
    ref = (centred / centred.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()).view(x.shape)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert float(ref.std()) > 0.5  # the spread survived the input's rounding
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_buffer_views_name_spans_of_one_buffer_on_first_use():
    class Demo(native.BufferViews):
        @staticmethod
        def _spans(n, c):
            return [("rows", n * c, (n, c)), ("cols", c, (c,))]

    buf = torch.arange(2 * 3 + 3, dtype=torch.float64)
    st = Demo(buf, 2, 3)
    assert "rows" not in vars(st)  # nothing made before it is read
    torch.testing.assert_close(st.rows, buf[:6].view(2, 3))
    torch.testing.assert_close(st.cols, buf[6:9])
    assert st.rows.data_ptr() == buf.data_ptr() and "rows" in vars(st)  # a view, kept once made
    with pytest.raises(AttributeError, match="no 'nope'"):
        st.nope


def _split_layer(kind: str, mode: str):
    """Group-local layers for the few-blocks test: LayerNorm2d, GroupNorm(2) or InstanceNorm in one of the modes."""
    from normzoo.channel_norm import Policy, channel_norm

    policy = {"ln2d": Policy("group", 1), "gn": Policy("group", 2), "in": Policy("instance")}[kind]
    return lambda x, w, b: channel_norm(x, w, b, policy, 1e-5, mode, moments=False)[0]


@pytest.mark.parametrize("kind", ["ln2d", "gn", "in"])
@pytest.mark.parametrize("mode", ["standard", "mean", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
# Split where the blocks would keep the threads under 3/4 busy. One sample on 2 threads (L = 1056 in 8 pieces):
# LayerNorm2d in both layouts, GroupNorm and InstanceNorm in channels_last. Two channels on 4 threads (L = 2048
# in 8 pieces): contiguous GroupNorm(2) and InstanceNorm too, blocks of one channel. And an L with no divisor
# that leaves pieces of 64 positions: not split.
@pytest.mark.parametrize("shape, threads", [((1, 8, 32, 33), 2), ((1, 2, 32, 64), 4), ((1, 8, 11, 13), 2)])
def test_few_group_blocks_are_split_over_the_threads(kind, mode, dtype, channels_last, shape, threads, fallback,
                                                      threads_kind):
    """With too few (n, g) blocks (contiguous) or samples (channels_last) for the threads, each block is split
    into pieces of its positions: moments per piece merged per channel and group, then the map; backward the
    sums per piece. Results as PyTorch's operations give them (in float64), in every mode."""
    torch.set_num_threads(threads)  # the `threaded` fixture restores the count
    x, w, b, g = _inputs(shape, dtype, channels_last, seed=5)
    fn = _split_layer(kind, mode)
    ours = _fwd_bwd(fn, x, w, b, g)
    ref = fallback(_fwd_bwd, fn, *(t.double() for t in (x, w, b, g)))
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for i, (a, r) in enumerate(zip(ours, ref)):
        t = tol if i < 2 else max(tol, 1e-5)  # parameter gradients: sums over the whole batch
        torch.testing.assert_close(a.double(), r, rtol=t, atol=t * (1 + float(r.abs().max())) if i >= 2 else t)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 512, 8, 16), (2, 256, 8, 8), (4, 96, 16, 8)])
def test_batch_norm_channels_last_with_many_channels_equals_fallback(shape, fallback, threads_kind):
    """channels_last BatchNorm cuts the N*L positions into as few pieces as the threads need (many channels:
    one piece per thread's tasks; few channels: more), merged per channel: every cut gives the fallback's
    results."""
    x, w, b, g = _inputs(shape, torch.float32, True, seed=6, scale=3.0, shift=-2.0)
    g = g.contiguous(memory_format=torch.channels_last)
    ours = _fwd_bwd(LAYERS["bn"], x, w, b, g)
    ref = fallback(_fwd_bwd, LAYERS["bn"], *(t.double() for t in (x, w, b, g)))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * (1 + float(r.abs().max())))


@pytest.mark.parametrize("name", ["bn", "mbn", "brn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
# contiguous BatchNorm runs per thread over blocks of channels (2 channels of 1056 values here), statistics then
# output per block: 7 channels on one thread end on a block of one; 17 on 2 threads give the threads 8 and 9, so
# one of them also ends short; 1 channel is a lone block
@pytest.mark.parametrize("shape, threads", [((3, 7, 32, 33), 1), ((4, 17, 32, 33), 2), ((3, 1, 32, 33), 1)])
def test_batch_norm_channel_blocks_equal_fallback(name, dtype, shape, threads, fallback, threads_kind):
    torch.set_num_threads(threads)  # the `threaded` fixture restores the count
    x, w, b, g = _inputs(shape, dtype, False, seed=7)
    ours = _fwd_bwd(LAYERS[name], x, w, b, g)
    ref = fallback(_fwd_bwd, LAYERS[name], *(t.double() for t in (x, w, b, g)))
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for i, (a, r) in enumerate(zip(ours, ref)):
        t = tol if i < 2 else max(tol, 1e-5)  # parameter gradients: sums over the whole batch
        torch.testing.assert_close(a.double(), r, rtol=t, atol=t * (1 + float(r.abs().max())) if i >= 2 else t)


_CORE_WITH_PARAMS = {
    "bn": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    "gn": lambda x, w, b: F.group_norm(x, 2, w, b),
    "ln2d": lambda x, w, b: F.layer_norm_2d(x, w, b),
    "ln": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
    "rms": lambda x, w, b: F.rms_norm(x, x.shape[-1:], w),
}


@pytest.mark.parametrize("name", sorted(_CORE_WITH_PARAMS))
@pytest.mark.parametrize("dtype, wdtype, bdtype", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64, torch.bfloat16),
    (torch.float64, torch.float32, torch.float16), (torch.bfloat16, torch.float16, None), (torch.float32, None, None)])
def test_core_kernels_take_parameters_of_their_own_dtype(name, dtype, wdtype, bdtype, fallback):
    """BatchNorm's, the group kernels' and the row kernels' parameters are read in their own dtype (float32,
    float64, bfloat16; float16 is converted first), absent ones are ones and zeros, and each gradient comes back
    in its parameter's dtype, equal to the PyTorch-operations path's."""
    x, w, b, g = _inputs((4, 6, 5, 6), dtype, False, seed=13)  # C = D = 6: one w, b for every layer
    w = None if wdtype is None else w.to(wdtype)
    b = None if bdtype is None or name == "rms" else b.to(bdtype)

    def run():
        leaves = [x.detach().clone().requires_grad_()] + [None if t is None else t.detach().clone().requires_grad_()
                                                          for t in (w, b)]
        y = _CORE_WITH_PARAMS[name](*leaves)
        y.backward(g)
        return [y.detach()] + [None if t is None else t.grad for t in leaves]

    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    got, want = run(), fallback(run)
    for a, r, p in zip(got, want, [x, x, w, b]):  # y, then the gradients of x, w, b
        if r is None:
            assert a is None
            continue
        assert a.dtype == r.dtype == (x.dtype if p is x else p.dtype)
        t = max(tol, 1e-2 if a.dtype in (torch.bfloat16, torch.float16) else 1e-5)
        torch.testing.assert_close(a.double(), r.double(), rtol=t, atol=t * (1 + float(r.abs().max())))


def test_batch_merged_forward_reads_adjacent_moments_in_place_and_others_copied():
    """Cross-Iteration BN's constant moments: two rows of one float64 block (as the native window merge gives
    them) are read in place; separate or float32 tensors are gathered first. The results agree."""
    x, w, b, _ = _inputs((4, 6, 5, 7), torch.float32, False, seed=14)
    block = torch.rand(2, 1, 6, dtype=torch.float64) + 0.5
    in_place = native.batch_merged_forward(x, w, b, 1e-5, "standard", 40.0, block[0], block[1])
    separate = native.batch_merged_forward(x, w, b, 1e-5, "standard", 40.0, block[0].clone(), block[1].clone())
    as_float = native.batch_merged_forward(x, w, b, 1e-5, "standard", 40.0, block[0].float(), block[1].float())
    for other in (separate, as_float):
        tol = 0 if other is separate else 1e-5
        torch.testing.assert_close(in_place[0], other[0], rtol=tol, atol=tol)
        torch.testing.assert_close(in_place[1], other[1], rtol=tol, atol=tol)
    assert not torch.equal(in_place[0], native.batch_forward(x, w, b, 1e-5, "standard")[0])  # the moments count


def test_supported_layout_is_the_layout_where_the_kernels_take_the_tensor():
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    x = torch.randn(2, 3, 4, 5)
    assert native.supported_layout(x) == 0 and native.supports(x)
    assert native.supported_layout(x.contiguous(memory_format=torch.channels_last)) == 1
    assert native.supported_layout(torch.randn(4, 3)) == 1  # a contiguous (N, C) counts as channels_last
    for t in (x.half(), x.transpose(2, 3), torch.empty(0, 3, 4, 5), x.int()):
        assert native.supported_layout(t) is None and not native.supports(t)


def test_find_compiler_cache_dir_and_compile_library(tmp_path, monkeypatch):
    """The build helpers the kernels and the compiled operators share."""
    assert native.find_compiler(None, "no-such-compiler-here", "sh") == "sh"
    assert native.find_compiler(None, "no-such-compiler-here") is None
    monkeypatch.setenv("NORMZOO_CACHE", str(tmp_path / "cache"))
    assert native.cache_dir() == tmp_path / "cache"
    lib = tmp_path / "out" / "lib.so"
    # the first command that succeeds builds it; {src} and {out} are the written source and the library
    assert native.compile_library("text", "a.c", lib, [["false"], ["cp", "{src}", "{out}"]]) is None
    assert lib.read_text() == "text"
    failed = tmp_path / "out" / "none.so"
    complaint = native.compile_library("x", "a.c", failed, [["sh", "-c", "echo broken >&2; exit 3"]])
    assert complaint is not None and "broken" in complaint and not failed.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lib.so"]  # no temporary left behind
