"""The compiled operators (normzoo.native_ops): built where a C++ compiler and PyTorch's headers exist, and the
same results, gradients, running statistics and refusals as the Python autograd ops they stand in for."""
import os
import shutil

import pytest
import torch

import normzoo
from normzoo import functional as F
from normzoo import native, native_ops


def _compiled_available() -> bool:
    return native_ops.ops() is not None


needs_compiled = pytest.mark.skipif("not _compiled_available()", reason="compiled operators unavailable here")


@pytest.fixture(params=["compiled", "python"])
def ops_kind(request):
    """Both autograd paths of the fused layers."""
    if request.param == "compiled" and not _compiled_available():
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    old = native_ops.use_compiled(request.param == "compiled")
    yield request.param
    native_ops.use_compiled(old)


def test_compiled_operators_build_where_a_cxx_compiler_and_torch_headers_exist():
    headers = os.path.join(os.path.dirname(torch.__file__), "include", "torch", "library.h")
    if native.library() is None or not any(shutil.which(c) for c in ("c++", "g++", "clang++")) \
            or not os.path.isfile(headers):
        pytest.skip("no native kernels, C++ compiler or PyTorch headers on this machine")
    assert native_ops.status() == "compiled"


def _run(fn, x, params, g):
    """Forward and backward with fresh leaves: ``y`` and the gradients of x and the params (None where not asked)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    leaves = [None if p is None else p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    y = fn(x, *leaves)
    wanted = [t for t in (x, *leaves) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, g) if wanted else ())
    return [y.detach()] + [next(grads) if t is not None and t.requires_grad else None for t in (x, *leaves)]


def _both(fn, *args):
    """``fn(*args)`` with the compiled operators and with the Python ops."""
    old = native_ops.use_compiled(True)
    try:
        compiled = fn(*args)
        native_ops.use_compiled(False)
        python = fn(*args)
    finally:
        native_ops.use_compiled(old)
    return compiled, python


def _assert_identical(a, b):
    """The same kernels on the same data: bit-for-bit the same results, dtypes and shapes."""
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride()
            assert torch.equal(u, v) or (u.isnan() == v.isnan()).all() and torch.equal(u.nan_to_num(), v.nan_to_num())


CHANNEL_LAYERS = {
    "bn": lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    "mbn": lambda x, w, b: F.mean_only_batch_norm(x, None, None, w, b, training=True),
    "in": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    "gn": lambda x, w, b: F.group_norm(x, 3, w, b),
    "ln2d": lambda x, w, b: F.layer_norm_2d(x, w, b),
    # eval: the running statistics (-1..2 and 0.5..3), fixed
    "bn_eval": lambda x, w, b: F.batch_norm(x, torch.linspace(-1, 2, x.shape[1]), torch.linspace(0.5, 3, x.shape[1]),
                                            w, b, training=False),
    "mbn_eval": lambda x, w, b: F.mean_only_batch_norm(x, torch.linspace(-1, 2, x.shape[1]), None, w, b,
                                                       training=False),
}
ROW_LAYERS = {
    "ln": lambda x, w, b: F.layer_norm(x, x.shape[-2:], w, b),
    "rms": lambda x, w, b: F.rms_norm(x, x.shape[-2:], w),
}


def _params(case, w, b, w_dtype, b_dtype):
    """The weight and bias of a parameter case: ``"float32"`` as given, ``"none"``, ``"bias only"`` (autograd numbers
    the given tensors only: the bias is then the op's second), other dtypes (``w_dtype``, ``b_dtype``), or not asked
    for a gradient (``"x only"``)."""
    if case == "none" or case == "bias only" and b is None:
        w = b = None
    elif case == "bias only":
        w = None
    elif "+" in case:
        w, b = w.to(w_dtype), None if b is None else b.to(b_dtype)
    return tuple(None if t is None else t.requires_grad_(case != "x only") for t in (w, b))


#: (name, shape, layouts of x and dy): 4-D input in both layouts (and a gradient in the other layout than the
#: input), 3-D input, and (N, C) for the BatchNorms (statistics over no spatial dims are not a per-sample op).
_CHANNEL_CASES = [(name, shape, x_cl, g_cl) for name in sorted(CHANNEL_LAYERS)
                  for shape in [(4, 6, 5, 7), (2, 6, 300, 2), (3, 6, 4), (5, 6)]
                  for x_cl, g_cl in ([(False, False), (True, True), (True, False), (False, True)] if len(shape) == 4
                                     else [(False, False)])
                  if len(shape) > 2 or name.startswith(("bn", "mbn"))]


@needs_compiled
@pytest.mark.parametrize("name, shape, x_cl, g_cl", _CHANNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("params", ["float32", "none", "bias only", "bfloat16+float16", "x only", "params only"])
def test_channel_layers_compiled_equal_python_ops(name, shape, x_cl, g_cl, dtype, params):
    """Every combination the layers route to the compiled operators: dtypes, both layouts, 2-D to 4-D input,
    parameter dtypes the kernels read (and float16, which they do not), absent parameters, and gradients asked
    for only some of the inputs."""
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[-1])
    x = (torch.randn(shape, generator=gen) * 2 + 1.5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if x_cl else x
    g = g.contiguous(memory_format=torch.channels_last) if g_cl else g
    w, b = _params(params, torch.randn(6, generator=gen), torch.randn(6, generator=gen), torch.bfloat16, torch.half)
    x.requires_grad_(params != "params only")
    compiled, python = _both(_run, CHANNEL_LAYERS[name], x, (w, b), g)
    _assert_identical(compiled, python)


@needs_compiled
@pytest.mark.parametrize("name", sorted(ROW_LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("params", ["float32", "none", "bias only", "float64+bfloat16", "x only", "params only"])
def test_row_layers_compiled_equal_python_ops(name, dtype, params):
    """LayerNorm and RMSNorm over two trailing dims: parameter gradients come back in their parameter's shape."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 4, 5, 6, generator=gen) + 3).to(dtype)
    g = torch.randn(3, 4, 5, 6, generator=gen).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)  # strided dy
    b = torch.randn(5, 6, generator=gen) if name != "rms" else None  # RMSNorm has no bias
    w, b = _params(params, torch.randn(5, 6, generator=gen), b, torch.float64, torch.bfloat16)
    x.requires_grad_(params != "params only")
    compiled, python = _both(_run, ROW_LAYERS[name], x, (w, b), g)
    _assert_identical(compiled, python)


@needs_compiled
@pytest.mark.parametrize("buffers", ["float32", "float64", "bfloat16", "float16", "mixed", "mean only", "var only"])
@pytest.mark.parametrize("momentum", [0.1, 1.0])
@pytest.mark.parametrize("mode", ["standard", "mean"])
def test_batch_norm_running_statistics_compiled_equal_python_ops(buffers, momentum, mode):
    """The running statistics the compiled BatchNorm updates, in its kernel (float32, float64, bfloat16 buffers of
    one dtype) or after it (float16, or buffers of two dtypes), are the Python op's."""
    special = {"mixed": (torch.float32, torch.float64), "mean only": (torch.float32, None),
               "var only": (None, torch.float32)}
    dtypes = special[buffers] if buffers in special else (getattr(torch, buffers),) * 2
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    fn = F.batch_norm if mode == "standard" else F.mean_only_batch_norm

    def run():
        rm = None if dtypes[0] is None else torch.zeros(3, dtype=dtypes[0])
        rv = None if dtypes[1] is None else torch.ones(3, dtype=dtypes[1])
        y = fn(x, rm, rv, training=True, momentum=momentum)
        return y, rm, rv

    compiled, python = _both(run)
    _assert_identical(compiled, python)


@pytest.mark.parametrize("name,shape", [("bn2d", (3, 4, 3, 3)), ("mbn2d", (3, 4, 3, 3)), ("in2d", (3, 4, 3, 3)),
                                        ("gn", (3, 4, 3, 3)), ("ln2d", (3, 4, 3, 3)), ("ln", (3, 5, 4)),
                                        ("rms", (3, 5, 4))])
def test_gradcheck_and_refused_second_derivative_on_both_paths(name, shape, ops_kind):
    """float64 gradcheck through the module, and under create_graph the right first derivative and a second
    derivative refused with once_differentiable's message, on the compiled and on the Python ops."""
    torch.manual_seed(0)
    kw = {"track_running_stats": False} if name in ("bn2d", "mbn2d") else {}  # no statistics to drift
    m = normzoo.create(name, 4, **kw).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *ps: m(x), (x, *m.parameters()))
    (g_plain,) = torch.autograd.grad(m(x).pow(2).sum(), x)
    (g,) = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(g, g_plain)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_use_compiled_switches_the_path_and_says_so():
    if not _compiled_available():
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    old = native_ops.use_compiled(False)
    try:
        assert native_ops.ops() is None and native_ops.status().startswith("python (switched off")
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        assert F.group_norm(x, 2).grad_fn.name() == "_GroupFnBackward"  # the Python autograd.Function
        native_ops.use_compiled(True)
        assert native_ops.status() == "compiled"
        assert F.group_norm(x, 2).grad_fn.name().endswith("::GroupOp>")  # torch::autograd::CppNode<...>
    finally:
        native_ops.use_compiled(old)


def test_without_a_cxx_compiler_the_python_ops_run_and_say_why(monkeypatch, capsys):
    monkeypatch.setattr(native_ops, "_loaded", False)
    monkeypatch.setattr(native_ops, "_ops", None)
    monkeypatch.setattr(native_ops, "_why_not", "not built yet")
    monkeypatch.setattr(native, "find_compiler", lambda *candidates: None)
    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.status()}")
    assert native_ops.ops() is None
    assert native_ops.status() == "python (no C++ compiler found (set CXX, or install g++))"
    assert "compiled operators unavailable" in capsys.readouterr().err
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    F.group_norm(x, 2).sum().backward()  # the Python op
    assert x.grad is not None


def test_normzoo_ops_0_keeps_the_python_ops_with_the_same_results(run_snippet):
    if not _compiled_available():
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    code = (
        "import torch, normzoo\n"
        "from normzoo import native_ops\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4, 6, 5, 5, requires_grad=True)\n"
        "for name in ('bn2d', 'gn', 'ln'):\n"
        "    m = normzoo.create(name, 6 if name != 'ln' else 5)\n"
        "    y = m(x); y.backward(torch.ones_like(y))\n"
        "    print(name, repr(float(y.square().sum())), repr(float(x.grad.abs().sum())), y.grad_fn.name())\n"
        "print(native_ops.status())\n"
    )
    runs = {flag: run_snippet(code, {"NORMZOO_OPS": flag}) for flag in ("0", "1")}
    assert runs["0"][-1].startswith("python (switched off") and runs["1"][-1] == "compiled"
    for off, on in zip(runs["0"][:-1], runs["1"][:-1]):
        assert off.split()[:3] == on.split()[:3]
        assert off.split()[3].endswith("FnBackward") and on.split()[3].startswith("torch::autograd::CppNode<")


def test_compiled_op_keeps_its_saved_input_checked_against_in_place_changes():
    """The op saves x as autograd's saved variables do: changing it in place before the backward is an error."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    h = x * 1
    y = F.group_norm(h, 2)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@needs_compiled
@pytest.mark.parametrize("name", ["bn2d", "mbn2d", "brn2d", "bin2d", "switch2d", "cbn2d", "in2d", "gn", "ln2d", "frn",
                                  "frn-learned-eps", "evonorm_s0", "evonorm_b0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_layers_over_steps_compiled_equal_python_ops(name, dtype, channels_last, affine):
    """Three training steps and one eval step of each layer on both paths: the same outputs, input and parameter
    gradients, and running statistics (Batch Renorm's r and d from them, Cross-Iteration BN's window over the
    steps), bit for bit."""
    import copy

    torch.manual_seed(0)
    kw = {"affine": affine}
    if name.startswith("frn"):
        kw["learnable_eps"] = name == "frn-learned-eps"
        name = "frn"
    if name == "cbn2d":
        kw.update(window=3, burn_in=1, compensate=False)
    if name == "in2d":
        kw.update(track_running_stats=True)
    layer = normzoo.create(name, 6, **kw).to(dtype)
    xs = [(torch.randn(4, 6, 5, 3) * (1 + i) + i).to(dtype) for i in range(4)]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]

    def run():
        m = copy.deepcopy(layer)
        seen = []
        for i, x in enumerate(xs):
            m.train(i < 3)
            x = x.clone().requires_grad_()
            y = m(x)
            y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.numel()).view(y.shape).to(dtype))
            seen += [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]
            m.zero_grad()
        return seen + [b.clone() for b in m.buffers()]

    compiled, python = _both(run)
    assert len(compiled) == len(python)
    _assert_identical(compiled, python)


@needs_compiled
def test_cross_iteration_step_with_buffers_the_window_kernels_do_not_take():
    """float16 window buffers (the layer in float16, its input float32): the compiled step merges and records them
    with tensor operations, as the Python path does (which merges in float16: hence the tolerance)."""
    import copy

    torch.manual_seed(0)
    layer = normzoo.create("cbn2d", 6, window=3, burn_in=1, compensate=False).half()
    xs = [torch.randn(4, 6, 5, 3) * (1 + i) + i for i in range(4)]

    def run():
        m = copy.deepcopy(layer)
        seen = []
        for x in xs:
            x = x.clone().requires_grad_()
            y = m(x)
            y.backward(torch.ones_like(y))
            seen += [y.detach(), x.grad]
        return seen + [b.clone() for b in m.buffers()]

    compiled, python = _both(run)
    for a, b in zip(compiled, python):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)


def test_torch_compile_runs_the_layers_as_eager_without_warnings():
    """Under torch.compile the layers take their Python ops (Dynamo breaks the graph there, silently, as it does
    for any autograd.Function it cannot trace), with eager's results and gradients."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normzoo.create("gn", 8, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 1), normzoo.create("bn2d", 8))
    x = torch.randn(2, 3, 8, 8)
    twin = __import__("copy").deepcopy(model)
    y_eager = model(x)
    y_eager.square().sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(twin)(x)
        y.square().sum().backward()
    assert [str(w.message) for w in caught if "Dynamo" in str(w.message)] == []
    torch.testing.assert_close(y, y_eager)
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_direct_entries_where_python_headers_exist_and_the_same_as_torch_ops():
    """Built with Python's headers, the library's own entry points serve the layers; they give what the registered
    torch.ops operators give, and refuse a wrong argument count or a non-tensor as errors, not crashes."""
    import sysconfig

    if not _compiled_available():
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    include = sysconfig.get_paths().get("include")
    if include is None or not os.path.isfile(os.path.join(include, "Python.h")):
        pytest.skip("Python's headers are not installed here")
    assert native_ops.entries() == "direct"
    ops = native_ops.ops()
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    dy = torch.randn(3, 6, 4, 4)
    results = []
    for call in (ops.group_norm, torch.ops.normzoo.group_norm):
        y = call(x, w, b, 3, 1e-5, 0, 0)
        results.append([y, *torch.autograd.grad(y, (x, w, b), dy)])
    _assert_identical(*results)
    y, stats = ops.batch_norm_stats(x, w, b, None, None, 0.0, 1e-5, 0, 0, False, 0.0, 0.0, 0.0, None, None)
    assert stats.shape == (3, 6) and stats.dtype == torch.float64 and not stats.requires_grad
    with pytest.raises(TypeError, match="expected 7 arguments, got 6"):
        ops.group_norm(x, w, b, 3, 1e-5, 0)
    with pytest.raises(RuntimeError, match="expected a tensor"):
        ops.group_norm("x", w, b, 3, 1e-5, 0, 0)
    with pytest.raises(TypeError):
        ops.group_norm(x, w, b, "3", 1e-5, 0, 0)


def test_without_python_headers_the_operators_are_called_through_torch_ops(run_snippet):
    """Built without Python's headers (as where they are not installed), the library has no entry points of its
    own: the layers call the registered torch.ops operators, with the same results."""
    if not _compiled_available():
        pytest.skip(f"compiled operators unavailable: {native_ops.status()}")
    code = (
        "import torch, normzoo\n"
        "from normzoo import native, native_ops\n"
        "if {no_headers}: native._python_include = lambda: None\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4, 6, 5, 5, requires_grad=True)\n"
        "m = normzoo.create('gn', 6, groups=3)\n"
        "y = m(x); y.backward(torch.ones_like(y))\n"
        "print(native_ops.entries())\n"
        "print(repr(float(y.square().sum())), repr(float(x.grad.abs().sum())))\n"
    )
    without, with_ = (run_snippet(code.format(no_headers=flag)) for flag in (True, False))
    assert without[0] == "torch.ops (built without Python's headers)"
    assert without[1] == with_[1]
