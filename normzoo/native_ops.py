"""The fused layers as compiled PyTorch operators, their autograd in C++ (``torch.ops.normzoo``), built on first use.

A layer written as a Python ``torch.autograd.Function`` pays for Python on every step: the engine calls back into
Python for the backward, and the op's argument handling, allocations and checks run as Python calls, each of them
a few hundred nanoseconds to microseconds once the step's data has pushed the interpreter out of the caches.
At small and medium sizes that is most of a step. ``_native/ops.cpp`` does what :class:`normzoo.channel_norm._GroupFn`
(InstanceNorm, GroupNorm, channel-first LayerNorm), ``_BatchFn`` (BatchNorm, mean-only BatchNorm, Batch Renorm and
Cross-Iteration BN training), :class:`normzoo.row_norm._RowNormFn` (LayerNorm, RMSNorm), and the native ops of
Switchable Norm, Batch-Instance Norm, Filter Response Norm and EvoNorm do, on the same kernels (:mod:`normzoo.native`, whose
addresses it is handed), as ``torch.autograd.Function`` in C++ behind registered operators. Measured on 2 cores
(GroupNorm, forward and backward, after a 300 us pause, balanced A/B, called through ``torch.ops``): at 2x32x4x4
100 us against the Python op's 127 (torch.nn 120, ``OMP_WAIT_POLICY=PASSIVE``); at 8x256x14x14 with OpenMP's
default wait policy 360 against 403 (torch.nn 372).

Where Python's headers are installed, the library is also an extension module whose entry points the layers call
(:func:`entries`): they convert the arguments by the C++ signatures and call the operators' functions directly,
7-17 us a step less than a call through ``torch.ops`` (its boxed path and the dispatcher). The operators stay
registered as ``torch.ops.normzoo.*`` either way.

They are built with PyTorch's own headers and libraries by the C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++``), about 15 s once, into the kernels' cache (:func:`normzoo.native.cache_dir`), keyed by the source, the
compiler and the PyTorch version. Where that fails, or with ``NORMZOO_OPS=0``, or after :func:`use_compiled(False)
<use_compiled>`, the Python ops run: the same kernels and results. :func:`status` says which is in use and why.
The callers (:func:`normzoo.channel_norm.sample_norm`, ``batch_stats_norm``, :func:`normzoo.row_norm.row_norm`)
route here only what the native kernels take (:func:`normzoo.native.supported_layout`).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List, NamedTuple, Optional, Tuple

import torch

from normzoo import native

_SOURCE = Path(__file__).with_name("_native") / "ops.cpp"
_STANDARDS = ("-std=c++20", "-std=c++17")  # the first the compiler takes (PyTorch's headers need C++17)
#: The kernel families bound, in the order ``normzoo::bind`` takes them (each float32, float64, bfloat16).
_FAMILIES = ("group_forward", "group_backward", "batch_forward", "batch_backward", "rownorm_forward",
             "rownorm_backward", "switch_forward", "switch_backward", "bin_forward", "bin_backward", "s0_forward",
             "s0_backward", "b0_forward", "b0_backward", "batch_fixed_forward")


class Ops(NamedTuple):
    """The compiled operators, called as functions (arguments as in ``_native/ops.cpp``'s schemas)."""

    group_norm: Any  #: ``(x, weight, bias, groups, eps, mode, lay) -> y``
    #: ``(x, weight, bias, groups, eps, mode, lay) -> (y, stats)``: :func:`normzoo.native.group_forward`'s block too
    group_norm_stats: Any
    batch_norm: Any  #: ``(x, weight, bias, running_mean, running_var, momentum, eps, mode, lay) -> y``
    #: ``(x, weight, bias, running_mean, running_var, momentum, eps, mode, lay, renorm, r_max, d_max, extra_count,
    #: extra_mean, extra_m2) -> (y, stats)``: the statistics block of :func:`normzoo.native.batch_forward` (Batch
    #: Renorm's and the window's variants too)
    batch_norm_stats: Any
    batch_norm_fixed: Any  #: ``(x, weight, bias, mean, var, eps, mode, lay) -> y``: eval with the given statistics
    row_norm: Any  #: ``(x, weight, bias, d, eps, rms) -> y``
    #: ``(x, weight, bias, running_mean, running_var, momentum, eps, lay, merge, count_p, mean_p, var_p, slot,
    #: count_buf, mean_buf, var_buf, keep_old) -> (y, stats, old, merged count)``: a Cross-Iteration BN step
    cross_iteration_norm: Any
    #: ``(x, weight, bias, mean_logits, var_logits, running_mean, running_var, use_batch, training, momentum, eps,
    #: lay) -> y``
    switchable_norm: Any
    #: ``(x, weight, bias, rho, running_mean, running_var, use_batch, training, momentum, eps, lay) -> y``
    batch_instance_norm: Any
    #: ``(x, weight, bias, tau, eps_t, eps, lay) -> z``: FRN with its TLU (``tau`` may be None); ``eps_t``: a
    #: learned eps of one value (its gradient is computed), or None for a constant ``eps``
    filter_response_norm: Any
    evonorm_s0: Any  #: ``(x, weight, bias, v, groups, eps, lay) -> y``
    #: ``(x, weight, bias, v, running_var, use_batch, momentum, eps, lay) -> (y, buf)``:
    #: :class:`normzoo.native_evonorm.B0State`'s buffer; the running variance read (not ``use_batch``) or updated
    evonorm_b0: Any
    #: ``(x, p0, p1, p2, p3) -> y``: an op that does no work (``y``, and in the backward the gradients, are
    #: uninitialized tensors like its inputs), applied as these are: ``normzoo bench``'s fixed cost of a step
    empty_step: Any


_MODULE_NAME = "_normzoo_ops"
_entries_kind = "the operators are not loaded"
_lock = threading.Lock()
_ops: Optional[Ops] = None
_loaded = False
_why_not = "not built yet"
_enabled = os.environ.get("NORMZOO_OPS", "1").strip().lower() not in ("0", "false", "no", "off")


def ops() -> Optional[Ops]:
    """The compiled operators, building them on first use; ``None`` where they are unavailable or switched off
    (then the layers use their Python autograd ops), and while ``torch.compile`` traces (its Dynamo does not know
    the operators' C++ entries and would warn for each; on the Python ops it breaks the graph silently, as it did
    before these existed)."""
    if not _loaded:
        _load()
    return _ops if _enabled and not _is_compiling() else None


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def use_compiled(enabled: bool) -> bool:
    """Use the compiled operators (``True``, where they can be built) or the Python ops; returns the previous
    setting. For comparisons and tests; ``NORMZOO_OPS=0`` sets ``False`` at import."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


def status() -> str:
    """``"compiled"``, or ``"python (<why>)"``: which autograd ops the fused layers use."""
    if not _enabled:
        return "python (switched off: NORMZOO_OPS=0 or use_compiled(False))"
    return "compiled" if ops() is not None else f"python ({_why_not})"


def _load() -> None:
    global _ops, _loaded, _why_not
    with _lock:
        if _loaded:
            return
        try:
            if native.library() is None:
                raise RuntimeError(f"the native kernels are unavailable ({native.status()})")
            _ops = _bind(*_build())
            _why_not = ""
        except Exception as exc:  # any failure: the Python ops run; say why once
            _why_not = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            print(f"normzoo: compiled operators unavailable, using the Python autograd ops ({_why_not})",
                  file=sys.stderr)
        _loaded = True


def _build() -> Tuple[Path, bool]:
    """Compile ``ops.cpp`` against this PyTorch (once per source, compiler and PyTorch): the library, and whether
    it has the Python entry points (built where Python's headers are installed; else, or if that build fails,
    without them)."""
    cxx = native.find_compiler(os.environ.get("CXX"), "c++", "g++", "clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    root = Path(torch.__file__).parent
    include = [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"]
    if not (include[0] / "torch" / "library.h").is_file():
        raise RuntimeError(f"PyTorch's C++ headers are not installed (no {include[0] / 'torch' / 'library.h'})")
    lib = root / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = ["-O2", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include),
             f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    src = _SOURCE.read_text()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    python = native._python_include()
    variants = [[]]  # extra flags: with the Python entry points first, where Python's headers are installed
    if python is not None:
        variants.insert(0, ["-DNZ_WITH_PYTHON", f"-I{python}", "-ltorch_python"]
                        + (["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []))
    failure: Optional[Exception] = None
    for extra in variants:
        key = hashlib.sha256("\0".join([src, cxx, *version, *flags, *extra, torch.__version__, sys.version,
                                        platform.machine()]).encode())
        path = native.cache_dir() / f"ops-{key.hexdigest()[:16]}.so"
        try:
            if not path.exists():
                _compile(cxx, src, flags + extra, path)
            return path, bool(extra)
        except RuntimeError as exc:
            failure = exc
    raise failure  # type: ignore[misc]


def _compile(cxx: str, src: str, flags: List[str], path: Path) -> None:
    print(f"normzoo: building the compiled operators into {path.parent} (once, about 15 s)", file=sys.stderr)
    commands = [[cxx, standard, "{src}", "-o", "{out}", *flags] for standard in _STANDARDS]
    failure = native.compile_library(src, "ops.cpp", path, commands)
    if failure is not None:
        raise RuntimeError(f"compiling the operators failed:\n{failure}")


def _bind(path: Path, entries: bool) -> Ops:
    """Load the operators (once per process: a library registers its namespace once), hand them the kernels, and
    return them as called from Python: the library's own entry points where it has them (``entries``), else
    through ``torch.ops``."""
    global _entries_kind
    if not hasattr(torch.ops.normzoo, "bind"):
        torch.ops.load_library(str(path))
    _send_kernels()
    module = None
    if entries:
        try:  # the same loaded library, imported as the extension module it also is
            module = native.import_extension(path, _MODULE_NAME)
        except Exception as exc:  # torch.ops serves
            module, _entries_kind = None, f"torch.ops (importing the entry points failed: {exc})"
    if module is not None:
        _entries_kind = "direct"
        return Ops(*(getattr(module, name) for name in Ops._fields))
    if not entries:
        _entries_kind = "torch.ops (built without Python's headers)"
    return Ops(*(_callable(getattr(torch.ops.normzoo, name).default) for name in Ops._fields))


def entries() -> str:
    """How Python calls the operators: ``"direct"`` (the library's own entry points) or ``"torch.ops (<why>)"``."""
    ops()
    return _entries_kind


def _send_kernels() -> None:
    lib = native.library()
    suffixes = [native._TYPES[dtype][0] for dtype in (torch.float32, torch.float64, torch.bfloat16)]
    names = [f"nz_{family}_{suf}" for family in _FAMILIES for suf in suffixes]
    names += ["nz_window_merge", "nz_window_record", "nz_pool_wake", "nz_switch_keep_size", "nz_bin_keep_size"]
    addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names]
    torch.ops.normzoo.bind(addresses, native.PARALLEL_THRESHOLD)


def rebind() -> None:
    """Hand the compiled operators :data:`normzoo.native.PARALLEL_THRESHOLD` again, after a change to it (they
    keep their own copy); nothing where they are not loaded."""
    if _ops is not None:
        _send_kernels()


def _callable(overload: Any) -> Any:
    """The operator's C++ entry (an ``OpOverload``'s ``_op``: its Python ``__call__`` only forwards to it)."""
    return getattr(overload, "_op", overload)


__all__ = ["Ops", "ops", "use_compiled", "status", "rebind", "entries"]
