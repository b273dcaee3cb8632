"""The native kernels: built where a C compiler exists, and equal to the PyTorch fallback."""
import shutil

import pytest
import torch

from normzoo import functional as F
from normzoo import native


def test_native_kernels_build_where_a_compiler_exists():
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine")
    assert native.status() == "native"


@pytest.fixture(autouse=True)
def threaded(monkeypatch):
    """Split even these small test tensors over two threads, so the per-thread code paths run."""
    monkeypatch.setattr(native, "PARALLEL_THRESHOLD", 1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


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
            m.setattr(native, "supports", lambda x: False)
            return fn(*args)
    return run


LAYERS = {
    "bn": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    "mbn": lambda x, w, b: F.mean_only_batch_norm(x, None, None, w, b, training=True),
    "in": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    "gn": lambda x, w, b: F.group_norm(x, 4, w, b),
    "ln2d": lambda x, w, b: F.layer_norm_2d(x, w, b),
}


def _fwd_bwd(fn, x, w, b, g):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 8, 5, 7), (16, 8, 32, 33)])
def test_native_equals_fallback(name, dtype, channels_last, shape, fallback, streaming):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 1.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    g = torch.randn(shape, generator=gen).to(dtype)
    ours = _fwd_bwd(LAYERS[name], x, w, b, g)
    ref = fallback(_fwd_bwd, LAYERS[name], x, w, b, g)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("rows", [5, 4096])  # threads split the rows, with per-thread column sums
def test_row_kernels_equal_fallback(rms, rows, fallback, streaming):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 96, generator=gen, dtype=torch.float64) + 0.7
    w, b = torch.randn(96, generator=gen, dtype=torch.float64), torch.randn(96, generator=gen, dtype=torch.float64)
    g = torch.randn(rows, 96, generator=gen, dtype=torch.float64)
    fn = (lambda x, w, b: F.rms_norm(x, 96, w, 1e-6)) if rms else (lambda x, w, b: F.layer_norm(x, 96, w, b))
    ours = _fwd_bwd(fn, x, w, b, g)
    ref = fallback(_fwd_bwd, fn, x, w, b, g)
    for a, r in zip(ours, ref):
        if r is None:
            assert a is None
        else:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_unsupported_layout_falls_back():
    x = torch.randn(4, 6, 5, 5).transpose(2, 3)  # neither contiguous nor channels_last
    assert native.layout(x) is None and not native.supports(x)
    y = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-4, atol=1e-5)


def test_bfloat16_rounding_is_to_nearest_even_and_keeps_nan():
    x = torch.tensor([[1.0, float("nan"), -3.0, 2.5]], dtype=torch.bfloat16).view(1, 1, 4).expand(2, 1, 4).contiguous()
    y = native.affine(x, torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))
    assert torch.isnan(y[0, 0, 1]) and torch.equal(y[:, :, [0, 2, 3]], x[:, :, [0, 2, 3]])


def _bn_in_child(x, want, queue) -> None:
    # only normzoo's kernels and NumPy run here: torch's own OpenMP pool hangs in a forked child
    torch.set_num_threads(2)
    y = F.batch_norm(x, None, None, training=True)
    queue.put(float(abs(y.numpy() - want.numpy()).max()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_worker_pool_survives_fork():
    """The kernels' worker threads do not exist in a forked child: it must start its own, not hang."""
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
