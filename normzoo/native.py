"""Native CPU kernels for the passes over full-size tensors, built on first use.

The kernels (``normzoo/_native/kernels.c.in``, the core, and method-specific ``_native/*.c.in`` files compiled
with it as one unit) are C, vectorized by the compiler and, for contiguous rows, written on GCC/Clang vector
extensions; their parallel jobs run on PyTorch's own OpenMP team, or on a small pthread pool (see
:func:`set_threads`). They need no
PyTorch headers: the system C compiler (``$CC`` or ``cc``/``gcc``) builds them once per machine (about 20 s),
into a per-user cache (``$NORMZOO_CACHE`` or ``~/.cache/normzoo``) keyed by the source, the compiler and the
CPU. They are loaded with :mod:`ctypes` and called on tensors' data pointers. This module binds the core; the
method-specific kernels have their bindings beside it (:mod:`normzoo.native_mixtures`,
:mod:`normzoo.native_evonorm`, :mod:`normzoo.native_window`, through :func:`declared`).

Where they do not apply (no compiler, ``NORMZOO_NATIVE=0``, a GPU tensor, float16, a layout that is
neither contiguous nor channels_last), :mod:`normzoo.kernels` falls back to stock PyTorch operations
with the same results. :func:`status` says which is in use and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_native") / "kernels.c.in"
_TYPES = {  # dtype: (suffix, storage type, arithmetic type, load, store)
    torch.float32: ("f32", "float", "float", "nz_ld_f32", "nz_st_f32"),
    torch.float64: ("f64", "double", "double", "nz_ld_f64", "nz_st_f64"),
    torch.bfloat16: ("bf16", "uint16_t", "float", "nz_ld_bf16", "nz_st_bf16"),
}
# -fno-trapping-math: no kernel relies on floating-point traps, and without it GCC keeps a select on a float
# compare (the TLU's mask) as a branch instead of vectorizing it
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
          "-pthread"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # Where the CPU has AVX-512, loops the compiler vectorizes by itself use it (GCC prefers 256-bit vectors by
    # default; the kernels' own vector types follow __AVX512F__, see NZ_VB). EvoNorm's sigmoid, a loop of its own:
    # S0 channels_last at 16x128x28x28 on 2 cores, forward 705 -> 602 us, backward 1084 -> 954; LayerNorm's
    # backward at 8x512x768 7% less; the other kernels within noise.
    _FLAGS.insert(2, "-mprefer-vector-width=512")
#: Below this many elements (256 KB of float32) a kernel runs on one thread. With the pool's workers woken as a
#: layer's Python begins (:func:`wake_workers`), a second thread pays from about 32K elements on: after a 300 us
#: idle, 2 threads against 1 at 4x512x7x7 (100K elements) took BatchNorm's kernels 63 + 74 us against 91 + 107,
#: GroupNorm's 48 + 79 against 66 + 116; at 2x64x16x16 (32K) the gain was 2-4 us, so the line is drawn above.
PARALLEL_THRESHOLD = 1 << 16

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_why_not: Optional[str] = None
_loaded = False
#: The library imported as a Python extension module, for its compiled entry points (:func:`entry`); or None.
_entries: Optional[Any] = None
_entries_why_not = "the native kernels are not loaded"
#: The modules whose ``_SIGNATURES`` get entry points besides the core's (:data:`_CORE_SIGNATURES`).
_SIGNATURE_MODULES = ("normzoo.native_mixtures", "normzoo.native_evonorm", "normzoo.native_window")
_MODULE_NAME = "_normzoo_kernels"


def _sources() -> Tuple[Path, ...]:
    """The C sources, compiled as one unit: the core (:data:`_SOURCE`: pool, loads and stores, the statistics
    passes) first, then the method-specific files beside it (``_native/*.c.in``) in name order."""
    return (_SOURCE,) + tuple(sorted(p for p in _SOURCE.parent.glob("*.c.in") if p != _SOURCE))


def _instantiate(text: str) -> str:
    """A source with its ``BEGIN_TYPED``/``END_TYPED`` section (if any) written out once per dtype in :data:`_TYPES`."""
    if "/* BEGIN_TYPED */" not in text:
        return text
    head, rest = text.split("/* BEGIN_TYPED */", 1)
    typed, tail = rest.split("/* END_TYPED */", 1)
    parts = [head]
    for suf, ctype, atype, ld, st in _TYPES.values():
        parts.append(typed.replace("$SUF", suf).replace("$T", ctype).replace("$A", atype).replace("$LD", ld)
                     .replace("$ST", st))
    parts.append(tail)
    return "".join(parts)


def _source_text() -> str:
    return "".join(_instantiate(p.read_text()) for p in _sources())


def _compiler() -> Optional[str]:
    return find_compiler(os.environ.get("CC"), "cc", "gcc", "clang")


def find_compiler(*candidates: Optional[str]) -> Optional[str]:
    """The first of ``candidates`` (commands; ``None`` skipped) found on the ``PATH``, or ``None``."""
    for cand in candidates:
        if cand and shutil.which(cand):
            return cand
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: ``$NORMZOO_CACHE``, else ``~/.cache/normzoo``."""
    return Path(os.environ.get("NORMZOO_CACHE", Path.home() / ".cache" / "normzoo"))


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _signature_maps() -> Tuple[Mapping[str, Any], ...]:
    """The core's signatures and those of the method-specific bindings (:data:`_SIGNATURE_MODULES`)."""
    return (_CORE_SIGNATURES, *(importlib.import_module(name)._SIGNATURES for name in _SIGNATURE_MODULES))


def _split(signature: Any) -> Tuple[Sequence[Any], Any]:
    """``(argtypes, restype)`` of a signature map's value: a list of argument types (a void function), or a tuple
    ``(argument types, result type)``."""
    return (signature[0], signature[1]) if isinstance(signature, tuple) else (signature, None)


def _full_names(name: str) -> Sequence[str]:
    """A signature map's name: one function, or one per dtype suffix where it contains ``{suf}``."""
    return sorted({name.format(suf=suf) for suf, *_ in _TYPES.values()})


_C_ARGS = {  # ctypes type: (C type, conversion of the Python object {o}, as ctypes converts it)
    ctypes.c_void_p: ("void *", "{o} == Py_None ? NULL : PyLong_AsVoidPtr({o})"),
    ctypes.c_int64: ("int64_t", "(int64_t)PyLong_AsLongLong({o})"),
    ctypes.c_int: ("int", "(int)PyLong_AsLong({o})"),
    ctypes.c_double: ("double", "PyFloat_AsDouble({o})"),
}
_C_RESULTS = {  # ctypes result type (None: void): (C type, the Python object of the result r)
    None: ("void", ""),
    ctypes.c_double: ("double", "PyFloat_FromDouble(r)"),
    ctypes.c_int: ("int", "PyLong_FromLong(r)"),
    ctypes.c_int64: ("int64_t", "PyLong_FromLongLong(r)"),
}


def _entry_points_source(maps: Sequence[Mapping[str, Any]]) -> str:
    """C for the Python extension module :data:`_MODULE_NAME`: one ``METH_FASTCALL`` entry point per function of
    the signature maps, which converts its arguments as ctypes would (``None`` a NULL pointer, ints, floats),
    releases the GIL around the call as ctypes does, and returns ``None`` or the result."""
    sigs = {full: _split(sig) for m in maps for name, sig in m.items() for full in _full_names(name)}
    out = ["", "/* ---- Python entry points (generated by normzoo.native._entry_points_source) ---- */",
           "#define PY_SSIZE_T_CLEAN", "#include <Python.h>",
           "static PyObject *nz_py_arity(const char *f, Py_ssize_t want, Py_ssize_t got) {",
           '    return PyErr_Format(PyExc_TypeError, "%s: expected %zd arguments, got %zd", f, want, got);', "}"]
    for full, (args, res) in sigs.items():
        ctype, result = _C_RESULTS[res]
        call = f"{full}({', '.join(f'a{i}' for i in range(len(args)))})"
        out += [f"static PyObject *nz_py_{full}(PyObject *self, PyObject *const *a, Py_ssize_t n) {{",
                f'    if (n != {len(args)}) return nz_py_arity("{full}", {len(args)}, n);']
        out += [f"    {_C_ARGS[t][0]} a{i} = {_C_ARGS[t][1].format(o=f'a[{i}]')};" for i, t in enumerate(args)]
        out += ["    if (PyErr_Occurred()) return NULL;"]
        if res is None:
            out += ["    Py_BEGIN_ALLOW_THREADS", f"    {call};", "    Py_END_ALLOW_THREADS", "    Py_RETURN_NONE;",
                    "}"]
        else:
            out += [f"    {ctype} r;", "    Py_BEGIN_ALLOW_THREADS", f"    r = {call};", "    Py_END_ALLOW_THREADS",
                    f"    return {result};", "}"]
    out += ["static PyMethodDef nz_py_methods[] = {"]
    out += [f'    {{"{full}", (PyCFunction)(void (*)(void))nz_py_{full}, METH_FASTCALL, NULL}},' for full in sigs]
    out += ["    {NULL, NULL, 0, NULL}", "};",
            "static struct PyModuleDef nz_py_module = "
            f'{{PyModuleDef_HEAD_INIT, "{_MODULE_NAME}", NULL, -1, nz_py_methods}};',
            f"PyMODINIT_FUNC PyInit_{_MODULE_NAME}(void) {{ return PyModule_Create(&nz_py_module); }}", ""]
    return "\n".join(out)


def _python_include() -> Optional[str]:
    """The directory of this Python's ``Python.h``, if it is installed (a distribution's python3-dev package)."""
    include = sysconfig.get_paths().get("include")
    return include if include and (Path(include) / "Python.h").is_file() else None


def _compile(cc: str, src: str, flags: Sequence[str], lib_path: Path) -> Optional[str]:
    """Compile ``src`` into ``lib_path``, atomically; the compiler's complaint if it fails, else None."""
    print(f"normzoo: building the native CPU kernels into {lib_path.parent} (once, about 20 s)", file=sys.stderr)
    return compile_library(src, "kernels.c", lib_path, [[cc, *_FLAGS, *flags, "{src}", "-o", "{out}", "-lm"]])


def compile_library(src: str, name: str, lib_path: Path, commands: Sequence[Sequence[str]]) -> Optional[str]:
    """Write ``src`` to a file ``name`` in a temporary folder beside ``lib_path`` and run the first of ``commands``
    that succeeds (``{src}`` and ``{out}`` stand for the source file and the library built), then move the library
    into place atomically: concurrent builders never see a partial file. The last command's complaint if none
    succeeds, else None."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    failure = "no compiler command"
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        src_file, out = Path(tmp) / name, Path(tmp) / lib_path.name
        src_file.write_text(src)
        for command in commands:
            args = [str(src_file) if a == "{src}" else str(out) if a == "{out}" else a for a in command]
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, lib_path)
                return None
            failure = proc.stderr[-2000:] or f"{args[0]} exited with {proc.returncode}"
    return failure


def _build() -> ctypes.CDLL:
    """Build (once per source, compiler, CPU and Python) and load the library; with Python's headers it is also
    an extension module, imported for its entry points (:data:`_entries`)."""
    global _entries, _entries_why_not
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src = _source_text()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    cache = cache_dir()
    include = _python_include()
    variants = [(src, [], [])]  # (source, flags, what else the build depends on)
    if include is not None and os.environ.get("NORMZOO_ENTRY_POINTS", "1").lower() not in ("0", "false", "no", "off"):
        abi = [include, str(sysconfig.get_config_var("EXT_SUFFIX")), sys.version]
        # macOS links an extension's calls into Python at load time, as the interpreter provides them
        flags = [f"-I{include}"] + (["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else [])
        variants.insert(0, (src + _entry_points_source(_signature_maps()), flags, abi))
    failure = None
    for text, flags, abi in variants:
        key = hashlib.sha256("\0".join([text, cc, *version, *_FLAGS, *flags, *abi, _cpu_id(),
                                        platform.machine()]).encode()).hexdigest()[:16]
        lib_path = cache / f"kernels-{key}.so"
        if not lib_path.exists():
            failure = _compile(cc, text, flags, lib_path)
            if failure is not None:
                continue
        lib = ctypes.CDLL(str(lib_path))
        _declare(lib)
        if flags:
            try:
                _entries, _entries_why_not = import_extension(lib_path), ""
            except Exception as exc:  # the library itself loaded: ctypes calls it
                _entries, _entries_why_not = None, f"importing them failed ({exc})"
        elif failure is not None:
            _entries_why_not = f"compiling them failed ({failure.strip().splitlines()[-1]})"
        elif include is None:
            _entries_why_not = "Python's C headers (Python.h) are not installed"
        else:
            _entries_why_not = "disabled by NORMZOO_ENTRY_POINTS=0"
        return lib
    raise RuntimeError(f"compiling the native kernels failed:\n{failure}")


def import_extension(lib_path: Path, name: str = _MODULE_NAME) -> Any:
    """A library already loaded (by ctypes, or ``torch.ops.load_library``) imported as the extension module ``name``
    it also is: the same loaded copy (for the kernels, one set of them and one thread pool)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(lib_path))
    spec = importlib.util.spec_from_file_location(name, str(lib_path), loader=loader)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    loader.exec_module(module)
    return module


_P, _I64, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
#: The core's functions: their argument types (a void function) or ``(argument types, result type)``; a name with
#: ``{suf}`` stands for one function per dtype suffix. Affine parameters (and their gradients) are passed as a
#: pointer and a type code (:func:`_typed_param`).
_CORE_SIGNATURES: Dict[str, Any] = {
    "nz_moments_{suf}": [_P, _I64, _I64, _I64, _I, _P, _P, _I],
    "nz_affine_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _P, _P, _I],
    "nz_grad_sums_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _P, _P, _I],
    "nz_affine_grad_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I, _P, _P, _P, _P, _I],
    "nz_rownorm_forward_{suf}": [_P, _P, _I64, _I64, _P, _I, _P, _I, _D, _I, _P, _P, _I],
    "nz_rownorm_backward_{suf}": [_P, _P, _P, _I64, _I64, _P, _I, _I, _P, _P, _P, _P, _I, _I],
    "nz_group_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I64, _I, _P, _I, _P, _I, _P, _I, _D, _I, _P, _P, _P, _I],
    "nz_group_backward_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I64, _I, _P, _I, _P, _I, _P, _I, _I, _P, _P, _P, _P, _P,
                                _P, _I],
    "nz_batch_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _I, _P, _I, _D, _I, _P, _P, _P, _P, _P, _I, _D, _P, _D,
                               _D, _D, _P, _P, _I],
    "nz_batch_backward_{suf}": [_P, _P, _P, _I64, _I64, _I64, _I, _P, _I, _P, _P, _I, _D, _P, _P, _P, _I, _I, _I],
    "nz_batch_fixed_forward_{suf}": [_P, _P, _I64, _I64, _I64, _I, _P, _I, _P, _I, _P, _I, _P, _I, _D, _I, _P, _I],
    "nz_set_stream_min": ([_I64], _I64),
    "nz_use_openmp": ([_P], _I),
    "nz_pool_wake": [],
    "nz_pool_sleeping": ([], _I),
    "nz_pool_wakeups": ([], _I64),
}


def _declare(lib: ctypes.CDLL, signatures: Mapping[str, Any] = _CORE_SIGNATURES) -> None:
    """Set ``argtypes`` and ``restype`` of the functions of a signature map on the ctypes library."""
    for name, signature in signatures.items():
        args, res = _split(signature)
        for full in _full_names(name):
            fn = getattr(lib, full)
            fn.argtypes, fn.restype = list(args), res


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first use; ``None`` if unavailable (see :func:`status`)."""
    global _lib, _why_not, _loaded
    if _loaded:
        return _lib
    with _lock:
        if not _loaded:
            if os.environ.get("NORMZOO_NATIVE", "1").lower() in ("0", "false", "no", "off"):
                _why_not = "disabled by NORMZOO_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # any failure: fall back to PyTorch operations, say why once
                    _why_not = str(exc)
                    print(f"normzoo: native kernels unavailable, using PyTorch operations ({exc})", file=sys.stderr)
            if _lib is not None:
                try:
                    _choose_threads(_lib)
                except Exception as exc:  # finding OpenMP failed: the pool always works
                    _use_threads(_lib, None, f"looking for PyTorch's OpenMP failed: {exc}")
            _loaded = True
    return _lib


_declared: Dict[str, int] = {}
_declared_maps: Dict[int, Tuple[Mapping[str, Any], int]] = {}  # id(signatures): (signatures, id(lib))


def declared(signatures: Mapping[str, Any]) -> ctypes.CDLL:
    """The kernel library with the ctypes ``argtypes`` and ``restype`` of these functions set, once per loaded
    library: for the method-specific bindings (:mod:`normzoo.native_mixtures`, :mod:`normzoo.native_evonorm`,
    :mod:`normzoo.native_window`). A map's value is a list of argument types (a void function) or ``(argument
    types, result type)``; a name containing ``{suf}`` stands for one function per dtype suffix (``f32``, ``f64``,
    ``bf16``). Raises ``RuntimeError`` without the native kernels (callers check :func:`supports` first)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are unavailable ({_why_not})")
    done = _declared_maps.get(id(signatures))
    if done is not None and done[0] is signatures and done[1] == id(lib):
        return lib
    for name, signature in signatures.items():
        if any(_declared.get(full) != id(lib) for full in _full_names(name)):
            _declare(lib, {name: signature})
            _declared.update((full, id(lib)) for full in _full_names(name))
    _declared_maps[id(signatures)] = (signatures, id(lib))
    return lib


_entry_cache: Dict[Tuple[str, Optional[torch.dtype]], Any] = {}


def entry(name: str, dtype: Optional[torch.dtype] = None, signatures: Optional[Mapping[str, Any]] = None) -> Any:
    """The callable for kernel ``name`` (of a signature map: ``{suf}`` filled in for ``dtype``): its compiled entry
    point where the library has them, else its ctypes function; both take the same arguments (data pointers as
    ints, ``None`` for NULL). ``signatures``: the method-specific map that declares it (the core's by default).
    Looked up once; raises ``RuntimeError`` without the native kernels."""
    key = (name, dtype)
    fn = _entry_cache.get(key)
    if fn is None:
        lib = declared(signatures if signatures is not None else _CORE_SIGNATURES)
        full = name.format(suf=_TYPES[dtype][0]) if dtype is not None else name
        fn = getattr(_entries, full, None) if _entries is not None else None
        _entry_cache[key] = fn = fn if fn is not None else getattr(lib, full)
    return fn


def entry_points() -> str:
    """``"compiled"`` or ``"ctypes (<why>)"``: how Python calls the kernels (see :func:`entry`)."""
    library()
    return "compiled" if _entries is not None else f"ctypes ({_entries_why_not})"


def set_stream_min(nbytes: int) -> int:
    """Write outputs of at least ``nbytes`` bytes with non-temporal stores (``-1``: never); returns the old value.

    Default 8 MiB: an output that large will not stay cached for the layer that reads it next, and
    streaming stores skip reading every destination line before writing it and leave the caches to the
    input, which the fused kernels read twice. Below it, ordinary stores keep the output cached.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"set_stream_min: the native kernels are unavailable ({_why_not})")
    return int(lib.nz_set_stream_min(int(nbytes)))


# -- threads ------------------------------------------------------------------------------------------
#: Where the kernels' parallel jobs run: ``"openmp"`` (PyTorch's own OpenMP team) or ``"pool"`` (normzoo's).
_threads_kind = "pool"
_threads_detail = "the native kernels are not loaded"
_OPENMP_RUNTIME = re.compile(r"^lib(gomp|omp|iomp5)\b.*\.(so|dylib)")


def _openmp_entry() -> Tuple[Optional[int], str]:
    """PyTorch's OpenMP runtime's ``GOMP_parallel`` (the GCC entry point, which GNU libgomp, LLVM libomp and
    Intel libiomp5 all export): ``(address, where it was found)``, or ``(None, why not)``."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "PyTorch's parallel backend is not OpenMP"
    loaded = []
    try:  # the runtimes loaded into this process (Linux), PyTorch's own first
        for line in Path("/proc/self/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and _OPENMP_RUNTIME.match(os.path.basename(parts[5])) and parts[5] not in loaded:
                loaded.append(parts[5])
    except OSError:
        pass
    torch_dir = str(Path(torch.__file__).parent)
    loaded.sort(key=lambda path: not path.startswith(torch_dir))
    for where in loaded + [None]:  # None: the process's global symbols
        try:
            entry = ctypes.CDLL(where).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return ctypes.cast(entry, ctypes.c_void_p).value, where or "the process's global symbols"
    return None, "no OpenMP runtime with GOMP_parallel found in this process"


def set_threads(kind: str) -> str:
    """Run the kernels' parallel jobs on ``"openmp"`` or ``"pool"`` threads; returns the previous kind.

    ``"openmp"`` (the default where PyTorch runs on OpenMP): jobs run on the same OpenMP team as PyTorch's own
    operators. Two pools on the same cores fight: after each parallel operator OpenMP's workers keep spinning
    (by default), holding the cores that another pool's workers need, and the other pool's workers spin in
    turn. On 2 cores with the default wait policy a GroupNorm step (8x256x14x14, forward and backward) took
    650 us beside PyTorch's spinning team and 350 us on it; a two-conv, two-BatchNorm block took 1.3 ms less
    per step. ``"pool"``: normzoo's own pthread pool, which starts a job before its workers are awake and
    wakes them as a layer begins. It is chosen at load where OpenMP's workers sleep at the end of every
    region (``OMP_WAIT_POLICY=PASSIVE``, as ``normzoo bench`` sets): they then hold no core, and every job
    on the team would wait for a sleeping worker to wake (that GroupNorm forward after a pause: 93 us on the
    pool, 126 us on the team, 101 us on one thread). It is also the fallback where OpenMP is unavailable,
    and in a forked child (OpenMP's team does not survive ``fork``). ``NORMZOO_THREADS=openmp`` or ``pool``
    overrides the choice at load.
    Raises ``ValueError`` for another kind, ``RuntimeError`` if the kind is unavailable.
    """
    if kind not in ("openmp", "pool"):
        raise ValueError(f"set_threads: kind must be 'openmp' or 'pool', got {kind!r}")
    lib = library()
    if lib is None:
        raise RuntimeError(f"set_threads: the native kernels are unavailable ({_why_not})")
    gomp, where = _openmp_entry() if kind == "openmp" else (None, "normzoo's pthread pool")
    if kind == "openmp" and gomp is None:
        raise RuntimeError(f"set_threads: OpenMP is unavailable ({where})")
    old = _threads_kind
    _use_threads(lib, gomp, where)
    return old


def _use_threads(lib: ctypes.CDLL, gomp: Optional[int], detail: str) -> None:
    global _threads_kind, _threads_detail
    lib.nz_use_openmp(gomp)
    _threads_kind, _threads_detail = ("openmp" if gomp else "pool"), detail


def _forked_child() -> None:  # the library switches itself to the pool in a forked child (pthread_atfork)
    global _threads_kind, _threads_detail
    if _threads_kind == "openmp":
        _threads_kind, _threads_detail = "pool", "a forked child: OpenMP's team does not survive fork"


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_child)


def threads() -> str:
    """Where the kernels' parallel jobs run: ``"openmp (<runtime>)"`` or ``"pool (<why>)"``."""
    library()
    return f"{_threads_kind} ({_threads_detail})"


def _choose_threads(lib: ctypes.CDLL) -> None:
    """At load: ``NORMZOO_THREADS`` (``openmp`` or ``pool``) if set; else the pool where OpenMP's workers
    sleep at the end of every region (``OMP_WAIT_POLICY=PASSIVE``), PyTorch's OpenMP team otherwise; the
    pool where there is no OpenMP (then saying why)."""
    wanted = os.environ.get("NORMZOO_THREADS", "").strip().lower()
    if wanted not in ("", "openmp", "pool"):
        print(f"normzoo: NORMZOO_THREADS must be 'openmp' or 'pool', got {wanted!r}; choosing by itself",
              file=sys.stderr)
        wanted = ""
    if wanted == "pool":
        _use_threads(lib, None, "NORMZOO_THREADS=pool")
        return
    if not wanted and os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        _use_threads(lib, None, "OMP_WAIT_POLICY=PASSIVE: OpenMP's team sleeps between regions")
        return
    _use_threads(lib, *_openmp_entry())


def wake_workers(x: Tensor) -> None:
    """Wake normzoo's pool's sleeping worker threads if ``x`` is large enough to be split over them.

    A layer calls this as its Python code begins: a worker asleep since the last kernel takes tens of
    microseconds to wake, which then overlaps the layer's own checks and bookkeeping instead of delaying its
    kernel. A no-op on PyTorch's OpenMP team (see :func:`set_threads`), when no worker sleeps, for small
    tensors, or without the native kernels (it never builds them).
    """
    if (_threads_kind == "pool" and _lib is not None and x.is_cpu and x.numel() >= PARALLEL_THRESHOLD
            and torch.get_num_threads() > 1):
        entry("nz_pool_wake")()


def pool_state() -> Tuple[int, int]:
    """The kernels' worker pool: ``(workers asleep now, times a worker woke up so far)``; ``(0, 0)`` without
    the native kernels. For tests and diagnostics."""
    if _lib is None:
        return 0, 0
    return int(_lib.nz_pool_sleeping()), int(_lib.nz_pool_wakeups())


def status() -> str:
    """``"native"`` or ``"pytorch (<reason>)"``: which implementation the full-size passes use."""
    return "native" if library() is not None else f"pytorch ({_why_not})"


def _enabled() -> bool:
    return library() is not None


# -- layouts -----------------------------------------------------------------------------------------
def layout(x: Tensor) -> Optional[int]:
    """0 for (N, C, *S) contiguous, 1 for channels_last (N, *S, C) contiguous, None for anything else.

    A contiguous ``(N, C)`` tensor counts as channels_last (``S`` empty), and so does a contiguous ``(N, C, 1, ...)``
    (one position: the same memory): its kernels then run along C, vectorized, instead of over N * C rows of one
    element (a 4096x512x1 BatchNorm1d ran 12x slower than torch's).
    """
    if x.is_contiguous():
        return 1 if x.dim() == 2 or (x.dim() > 2 and x.numel() == x.shape[0] * x.shape[1]) else 0
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None:  # torch's own flag, kept with the tensor: no view made per call (~4 us each)
        return 1 if x.is_contiguous(memory_format=fmt) else None
    return 1 if x.dim() >= 3 and _channels_last_strides(x.shape, x.stride()) else None


#: The memory formats whose flag is ``layout(x) == 1`` for 4-D and 5-D tensors.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last_strides(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether ``(N, C, *S)`` with these strides is ``(N, *S, C)`` contiguous: walking C, then S from the last dim,
    then N, each dim of more than one element has the stride of the elements inside it (torch's rule)."""
    expected = 1
    for d in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def supports(x: Tensor) -> bool:
    """Whether the native kernels can take ``x`` (CPU, float32/float64/bfloat16, contiguous or channels_last)."""
    return supported_layout(x) is not None


def supported_layout(x: Tensor) -> Optional[int]:
    """``x``'s :func:`layout` where the native kernels can take ``x`` (:func:`supports`), else ``None``.

    For a layer's hot path, which asks once and hands the answer on to the kernels' wrappers (their ``lay``
    argument) and to its backward: after the thread has slept, every call into a tensor's Python binding costs
    about half a microsecond, and a layer's step made a dozen redundant ones.
    """
    # (x.device.type builds a device object: several times the cost of x.is_cpu, after a kernel has run)
    if x.is_cpu and x.dtype in _TYPES and x.numel() > 0 and _enabled():
        return layout(x)
    return None


def _threads(numel: int) -> int:
    return 1 if numel < PARALLEL_THRESHOLD else max(1, torch.get_num_threads())


def _dims(x: Tensor) -> Tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


def _nc(t: Tensor, n: int, c: int) -> Tensor:
    """A per-(n, c) coefficient (any shape broadcastable to (N, C)) as a contiguous float64 (N, C) array."""
    if t.dtype == torch.float64 and t.shape == (n, c) and t.is_contiguous():
        return t  # the usual case (the mixing algebra's outputs): no three dispatched no-op calls
    return t.to(torch.float64).expand(n, c).contiguous()


def _fn(name: str, dtype: torch.dtype):
    """The core's kernel ``nz_<name>_<dtype's suffix>`` (:func:`entry`)."""
    return entry(f"nz_{name}_{{suf}}", dtype)


def _like(x: Tensor, other: Tensor, lay: Optional[int] = None) -> Tensor:
    """``other`` in ``x``'s memory layout and dtype (a copy only when they differ); ``lay``: ``x``'s :func:`layout`,
    where the caller knows it."""
    lay = layout(x) if lay is None else lay
    if other.dtype == x.dtype and layout(other) == lay:
        return other
    fmt = torch.contiguous_format if lay == 0 else (torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if x.dim() in (4, 5) or lay == 0:
        return other.to(x.dtype).contiguous(memory_format=fmt)
    return other.to(x.dtype).movedim(1, -1).contiguous().movedim(-1, 1)


# -- the channel passes ------------------------------------------------------------------------------
def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and M2 over the spatial dims, float64 ``(N, C)`` each (exact: shifted sums)."""
    n, c, l = _dims(x)
    mean = torch.empty(n, c, dtype=torch.float64)
    m2 = torch.empty(n, c, dtype=torch.float64)
    _fn("moments", x.dtype)(x.data_ptr(), n, c, l, layout(x), mean.data_ptr(), m2.data_ptr(), _threads(x.numel()))
    return mean, m2


def affine(x: Tensor, a: Tensor, centre: Tensor, b: Tensor) -> Tensor:
    """``y = a * (x - centre) + b`` per (n, c), in ``x``'s dtype and layout."""
    n, c, l = _dims(x)
    y = torch.empty_like(x)
    a, centre, b = _nc(a, n, c), _nc(centre, n, c), _nc(b, n, c)
    _fn("affine", x.dtype)(x.data_ptr(), y.data_ptr(), n, c, l, layout(x), a.data_ptr(), centre.data_ptr(),
                           b.data_ptr(), _threads(x.numel()))
    return y


def grad_sums(dy: Tensor, x: Tensor, centre: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum dy`` and ``sum dy * (x - centre)``, float64 ``(N, C)`` each."""
    n, c, l = _dims(x)
    dy = _like(x, dy)
    centre = _nc(centre, n, c)
    s1 = torch.empty(n, c, dtype=torch.float64)
    s2 = torch.empty(n, c, dtype=torch.float64)
    _fn("grad_sums", x.dtype)(dy.data_ptr(), x.data_ptr(), n, c, l, layout(x), centre.data_ptr(), s1.data_ptr(),
                              s2.data_ptr(), _threads(x.numel()))
    return s1, s2


def affine_grad(dy: Tensor, x: Tensor, k1: Tensor, k2: Tensor, centre: Tensor, k3: Tensor) -> Tensor:
    """``dx = k1 * dy + k2 * (x - centre) + k3`` per (n, c), in ``x``'s dtype and layout."""
    n, c, l = _dims(x)
    dy = _like(x, dy)
    dx = torch.empty_like(x)
    k1, k2, centre, k3 = (_nc(t, n, c) for t in (k1, k2, centre, k3))
    _fn("affine_grad", x.dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, l, layout(x), k1.data_ptr(),
                                k2.data_ptr(), centre.data_ptr(), k3.data_ptr(), _threads(x.numel()))
    return dx


# -- affine parameters in, their gradients out -------------------------------------------------------
def _arith(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic type for ``dtype`` input: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: :func:`_arith` of the dtypes the kernels take, for the wrappers below (a lookup, not a call).
_ARITH = {dtype: _arith(dtype) for dtype in _TYPES}


def _typed_param(t: Optional[Tensor], size: int, fallback: torch.dtype) -> Tuple[Optional[Tensor], int]:
    """A parameter as the kernels read it, with its type code (those of :data:`_RUNNING_TYPES`): itself where it
    is a contiguous tensor of ``size`` values of a type they read (float32, float64, bfloat16: a bfloat16 model's
    parameters need no conversion), else a copy in ``fallback``; ``(None, 0)`` when absent."""
    if t is None:
        return None, 0
    code = _RUNNING_TYPES.get(t.dtype)
    if code is None or not t.is_contiguous() or t.numel() != size:
        t = t.detach().reshape(size).to(fallback).contiguous()
        code = _RUNNING_TYPES[fallback]
    return t, code


def _typed_buffer(dtype: Optional[torch.dtype], size: int, fallback: torch.dtype) -> Tuple[Tensor, int]:
    """A ``(size,)`` buffer for a kernel to write a parameter's gradient into, with its type code: in the
    parameter's ``dtype`` where the kernels write it, else in ``fallback`` (the caller converts)."""
    want = dtype if dtype in _RUNNING_TYPES else fallback
    return torch.empty(size, dtype=want), _RUNNING_TYPES[want]


def _grad_out(wanted: bool, size: int, param_dtype: Optional[torch.dtype], code: int,
              arith: torch.dtype) -> Tuple[Optional[Tensor], int]:
    """The core kernels' buffer for a parameter's gradient, which they write in the type they read the parameter
    in: ``(buffer, its code)`` in ``param_dtype`` (the parameter's, or the dtype of one not passed) where they
    write that type, else in ``arith`` (the input's arithmetic type); where not wanted ``(None, code)``, the
    parameter's code kept."""
    return _typed_buffer(param_dtype, size, arith) if wanted else (None, code)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _stats(count: int, *shape: int) -> Tuple[Tensor, ...]:
    """``count`` float64 statistics arrays of ``shape``, views of one allocation."""
    return tuple(torch.empty(count, *shape, dtype=torch.float64).unbind(0))


class BufferViews:
    """Named float64 views into the buffer a method's kernel writes for its backward, made on first use: a view
    costs about a microsecond, and a layer's hot path reads only one or two of them. Subclasses list ``(name, size,
    shape)`` spans of ``buf`` in order (``_spans(n, c)``)."""

    def __init__(self, buf: Tensor, n: int, c: int) -> None:
        self.buf, self._n, self._c = buf, n, c

    @staticmethod
    def _spans(n: int, c: int) -> Sequence[Tuple[str, int, Tuple[int, ...]]]:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:  # only for names not set yet
        if name.startswith("_") or name == "buf":
            raise AttributeError(name)
        offset = 0
        for field, size, shape in self._spans(self._n, self._c):
            if field == name:
                view = self.buf[offset:offset + size].view(shape)
                break
            offset += size
        else:
            raise AttributeError(f"{type(self).__name__} has no {name!r}")
        setattr(self, name, view)
        return view


# -- the fused group passes (statistics local to a sample: IN, GN, channel-first LN) ------------------
_MODES = {"standard": 0, "mean": 1, "rms": 2}


def group_forward(x: Tensor, groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  mode: str, tau: Optional[Tensor] = None, lay: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Fused per-(sample, channel group) normalization of ``x`` ``(N, C, *S)``: ``y`` and the group statistics,
    one float64 ``(3, N, G)`` block of ``mean``, ``M2`` and ``rstd`` (one allocation: a layer's hot path
    does not pay for three tensors it may never look at). Reads ``x`` once from memory (the block stays in
    cache). ``tau`` ``(C,)``: the TLU after the affine map, ``y = max(gamma x_hat + beta, tau)`` (FRN).
    ``lay``: ``x``'s layout as :func:`supported_layout` gave it (looked up when ``None``)."""
    shape, numel, dtype = x.shape, x.numel(), x.dtype
    n, c = shape[0], shape[1]
    y = torch.empty_like(x)
    stats = torch.empty(3, n, groups, dtype=torch.float64)
    p, step = stats.data_ptr(), 8 * n * groups
    a = _ARITH[dtype]
    (g, gt), (b, bt), (t, tt) = _typed_param(weight, c, a), _typed_param(bias, c, a), _typed_param(tau, c, a)
    _fn("group_forward", dtype)(x.data_ptr(), y.data_ptr(), n, c, numel // (n * c), groups,
                                layout(x) if lay is None else lay, _ptr(g), gt, _ptr(b), bt, _ptr(t), tt, float(eps),
                                _MODES[mode], p, p + step, p + 2 * step, _threads(numel))
    return y, stats


class GroupGrads(NamedTuple):
    """What :func:`group_backward` returns; a gradient not asked for is ``None``."""

    dx: Tensor
    dgamma: Optional[Tensor]  #: ``(C,)`` ``sum dy * x_hat`` (float32, float64 for float64 input)
    dbeta: Optional[Tensor]  #: ``(C,)`` ``sum dy``
    dtau: Optional[Tensor]  #: ``(C,)`` the TLU threshold's: ``sum dy`` where it won (in tau's dtype, as dgamma)
    drstd: Optional[Tensor]  #: float64 ``(N, G)``: ``dL / d rstd`` of each group


def group_backward(dy: Tensor, x: Tensor, groups: int, weight: Optional[Tensor], stats: Tensor, mode: str,
                   dgamma: bool = True, dbeta: bool = True, bias: Optional[Tensor] = None,
                   tau: Optional[Tensor] = None, dtau: bool = False, drstd: bool = False,
                   bias_dtype: Optional[torch.dtype] = None, lay: Optional[int] = None) -> GroupGrads:
    """Fused backward of :func:`group_forward`, from its statistics block ``stats`` (with the same ``bias`` and
    ``tau`` when it had a TLU: ``dy`` then flows where ``gamma x_hat + beta >= tau``, ties included). ``dx``
    always; ``dgamma``, ``dbeta``, ``dtau`` and ``drstd`` where asked for; ``dgamma`` in the weight's dtype and
    ``dbeta`` in the bias's (``bias``, else ``bias_dtype``) where the kernels write those types.
    ``lay``: from an autograd op that hands back ``stats`` as :func:`group_forward` gave them for this ``x``, and
    ``x``'s layout as :func:`supported_layout` gave it (then ``stats`` is not checked again); ``None``: both
    are checked here."""
    shape, numel, dtype = x.shape, x.numel(), x.dtype
    n, c = shape[0], shape[1]
    if lay is None:
        if stats.shape != (3, n, groups) or stats.dtype != torch.float64 or not stats.is_contiguous():
            raise ValueError(f"group_backward: stats must be group_forward's contiguous float64 (3, {n}, {groups}) "
                             f"block, got {stats.dtype} {tuple(stats.shape)}")
        lay = layout(x)
    dy = _like(x, dy, lay)
    dx = torch.empty_like(x)
    a = _ARITH[dtype]
    (g, gt), (b, bt), (t, tt) = _typed_param(weight, c, a), _typed_param(bias, c, a), _typed_param(tau, c, a)
    dg, gt = _grad_out(dgamma, c, _CODE_DTYPES.get(gt), gt, a)
    db, bt = _grad_out(dbeta, c, bias_dtype if b is None else _CODE_DTYPES[bt], bt, a)
    dt, tt = _grad_out(dtau and t is not None, c, _CODE_DTYPES.get(tt), tt, a)
    dr = torch.empty(n, groups, dtype=torch.float64) if drstd else None
    p = stats.data_ptr()
    _fn("group_backward", dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, numel // (n * c), groups, lay,
                                 _ptr(g), gt, _ptr(b), bt, _ptr(t), tt, _MODES[mode], p, p + 16 * n * groups, _ptr(dg),
                                 _ptr(db), _ptr(dt), _ptr(dr), _threads(numel))
    return GroupGrads(dx, dg, db, dt, dr)


# -- BatchNorm training, whole (the per-channel algebra in C too: one call each way) --------------------
_RUNNING_TYPES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _RUNNING_TYPES.items()}


def running_update_applies(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> bool:
    """Whether :func:`batch_forward` can update these running statistics in place: CPU, float32, float64 or
    bfloat16, contiguous ``(C,)``, the two of one dtype (either may be ``None``)."""
    first = running_mean if running_mean is not None else running_var
    if first is None or first.dtype not in _RUNNING_TYPES:
        return False
    for t in (running_mean, running_var):
        if t is not None and not (t.is_cpu and t.dim() == 1 and t.is_contiguous() and t.dtype == first.dtype):
            return False
    return True


def _running_type(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> int:
    """The kernels' code for the running buffers' type (0: none given); they must be ones the kernels can take."""
    if running_mean is None and running_var is None:
        return 0
    if not running_update_applies(running_mean, running_var):
        raise ValueError("native kernels: running statistics must be contiguous (C,) float32, float64 or bfloat16 "
                         "CPU tensors of one dtype")
    return _RUNNING_TYPES[(running_mean if running_mean is not None else running_var).dtype]


def batch_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mode: str,
                  running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  momentum: float = 0.0, lay: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """BatchNorm of ``x`` ``(N, C, *S)`` with batch statistics: ``y`` and the channel statistics, one float64
    ``(3, C)`` block of ``mean``, ``M2`` and ``rstd`` (for :func:`batch_backward`).

    ``running_mean``/``running_var`` (where :func:`running_update_applies`) are updated in place,
    ``running += momentum * (batch - running)`` with the unbiased batch variance, as ``torch.lerp_`` would.
    ``lay`` as in :func:`group_forward`.
    """
    return _batch_forward(x, weight, bias, eps, mode, running_mean, running_var, momentum, lay=lay)


def batch_renorm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         running_mean: Tensor, running_var: Tensor, momentum: float, r_max: float,
                         d_max: float) -> Tuple[Tensor, Tensor]:
    """Batch Renormalization (training) of ``x``: BatchNorm with weight ``gamma r`` and bias ``beta + gamma d``,
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` from the
    running statistics, which are then updated in place as in :func:`batch_forward`.
    Returns ``y`` and a float64 ``(5, C)`` block: ``mean``, ``M2``, ``rstd``, ``r``, ``d``."""
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm_forward: needs both running_mean and running_var")
    return _batch_forward(x, weight, bias, eps, "standard", running_mean, running_var, momentum,
                          limits=(r_max, d_max))


def batch_fixed_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                        var: Optional[Tensor], eps: float, mode: str, lay: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """BatchNorm of ``x`` with fixed statistics (eval mode: the running ones), ``y = gamma (x - mean) rstd + beta``,
    ``rstd = (var + eps)^-1/2`` (``mode="mean"``: 1, and ``var`` may be None). ``mean`` and ``var``: ``(C,)``, read in
    double (a dtype other than float32, float64 or bfloat16, or a non-contiguous buffer, as a float64 copy). Returns
    ``y`` and a float64 ``(2, C)`` block of ``mean`` and ``rstd``; backward: :func:`batch_backward` with
    ``fixed=True``. ``lay`` as in :func:`group_forward`."""
    shape, numel, dtype = x.shape, x.numel(), x.dtype
    n, c = shape[0], shape[1]
    y = torch.empty_like(x)
    stats = torch.empty(2, c, dtype=torch.float64)
    a = _ARITH[dtype]
    (g, gt), (b, bt) = _typed_param(weight, c, a), _typed_param(bias, c, a)
    (m, mt), (v, vt) = _typed_param(mean, c, torch.float64), _typed_param(var, c, torch.float64)
    if mode != "mean" and v is None:
        raise ValueError("batch_fixed_forward: needs var unless mode='mean'")
    _fn("batch_fixed_forward", dtype)(x.data_ptr(), y.data_ptr(), n, c, numel // (n * c),
                                      layout(x) if lay is None else lay, _ptr(g), gt, _ptr(b), bt, _ptr(m), mt,
                                      _ptr(v), vt, float(eps), _MODES[mode], stats.data_ptr(), _threads(numel))
    return y, stats


def batch_merged_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mode: str,
                         extra_count: float, extra_mean: Tensor, extra_m2: Tensor,
                         running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                         momentum: float = 0.0, lay: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """BatchNorm of ``x`` with each channel's batch moments merged with constant ones (``extra_count``
    elements with mean ``extra_mean`` and M2 ``extra_m2``, float64 ``(C,)``): Cross-Iteration BN's window.
    Returns ``y`` and a float64 ``(5, C)`` block: the merged ``mean``, ``M2``, ``rstd``, and the batch's own
    ``mean``, ``M2`` (those update the running statistics, if given). Backward: :func:`batch_backward` with
    ``count = N * prod(S) + extra_count``."""
    c = x.shape[1]
    if (extra_mean.dtype == extra_m2.dtype == torch.float64 and extra_mean.numel() == extra_m2.numel() == c
            and extra_mean.is_contiguous() and extra_m2.is_contiguous()
            and extra_m2.data_ptr() == extra_mean.data_ptr() + 8 * c):
        extra = extra_mean  # the two rows of one block, as the native window merge gives them: read in place
    else:
        extra = torch.cat([extra_mean.reshape(-1), extra_m2.reshape(-1)]).to(torch.float64)
    return _batch_forward(x, weight, bias, eps, mode, running_mean, running_var, momentum,
                          extra=(float(extra_count), extra), lay=lay)


def _batch_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mode: str,
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                   limits: Optional[Tuple[float, float]] = None,
                   extra: Optional[Tuple[float, Tensor]] = None, lay: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The one native BatchNorm forward behind the three above: ``y`` and one float64 ``(k, C)`` statistics
    block, rows ``mean, M2, rstd``, then ``r, d`` (``limits``), then the batch's own ``mean, M2`` (``extra``).
    ``lay`` as in :func:`group_forward`."""
    shape, numel, dtype = x.shape, x.numel(), x.dtype
    n, c = shape[0], shape[1]
    l = numel // (n * c)
    y = torch.empty_like(x)
    rows = 3 + 2 * bool(limits) + 2 * bool(extra)
    stats = torch.empty(rows, c, dtype=torch.float64)
    p, row = stats.data_ptr(), 8 * c
    a = _ARITH[dtype]
    (g, gt), (b, bt) = _typed_param(weight, c, a), _typed_param(bias, c, a)
    run_type = _running_type(running_mean, running_var)
    r_max, d_max = limits if limits else (0.0, 0.0)
    count, mm = (n * l + extra[0], extra[1]) if extra else (float(n * l), None)
    _fn("batch_forward", dtype)(x.data_ptr(), y.data_ptr(), n, c, l, layout(x) if lay is None else lay, _ptr(g), gt,
                                _ptr(b), bt, float(eps), _MODES[mode], p, p + row, p + 2 * row, _ptr(running_mean),
                                _ptr(running_var), run_type, float(momentum), p + 3 * row if limits else None,
                                float(r_max), float(d_max), float(count), _ptr(mm),
                                p + (rows - 2) * row if extra else None, _threads(numel))
    return y, stats


def batch_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor, mode: str,
                   dgamma: bool = True, dbeta: bool = True, count: Optional[float] = None,
                   bias_dtype: Optional[torch.dtype] = None, renorm: bool = False,
                   lay: Optional[int] = None, fixed: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward of :func:`batch_forward` (and its two variants) from the forward's statistics block ``stats``
    (its rows ``mean`` and ``rstd`` are used): ``dx``, and where asked for ``(C,)`` ``dgamma``, ``dbeta``, in the
    weight's and ``bias_dtype`` where the kernels write those types (float32, float64, bfloat16), else float32
    (float64 for float64 input). ``count``: the elements behind the statistics when more than the batch's
    (:func:`batch_merged_forward`). ``renorm``: the backward of :func:`batch_renorm_forward`, whose block's
    rows 3 and 4 hold ``r`` and ``d``: BatchNorm's with the weight ``gamma r``, and
    ``dgamma = r sum dy x_hat + d sum dy``. ``lay`` as in :func:`group_backward`. ``fixed``: the backward of
    :func:`batch_fixed_forward` (its block's rows 0 and 1: ``mean``, ``rstd``), ``dx = gamma rstd dy``; there, with
    neither parameter gradient asked for, ``x`` is not read (only its shape, dtype and layout, which are ``dy``'s)."""
    shape, numel, dtype = x.shape, x.numel(), x.dtype
    n, c = shape[0], shape[1]
    if lay is None:
        rows = 5 if renorm else (2 if fixed else 3)
        if stats.dim() != 2 or stats.shape[0] < rows or stats.shape[1] != c \
                or stats.dtype != torch.float64 or not stats.is_contiguous():
            kind = " renorm" if renorm else (" fixed" if fixed else "")
            raise ValueError(f"batch_backward: stats must be a batch{kind} forward's "
                             f"contiguous float64 (k, {c}) block, got {stats.dtype} {tuple(stats.shape)}")
        lay = layout(x)
    dy = _like(x, dy, lay)
    dx = torch.empty_like(x)
    a = _ARITH[dtype]
    g, gt = _typed_param(weight, c, a)
    dg, gt = _grad_out(dgamma, c, _CODE_DTYPES.get(gt), gt, a)
    db, bt = _grad_out(dbeta, c, bias_dtype, 0, a)
    p = stats.data_ptr()
    rstd = p + (8 if fixed else 16) * c
    _fn("batch_backward", dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), n, c, numel // (n * c), lay, _ptr(g), gt,
                                 p, rstd, _MODES[mode], float(count or 0.0), p + 24 * c if renorm else None,
                                 _ptr(dg), _ptr(db), bt, int(fixed), _threads(numel))
    return dx, dg, db


# -- the fused row passes (LayerNorm / RMSNorm over the last dims) ------------------------------------

def rownorm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
                    d: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Rows of ``d`` values (default: the last dim) of contiguous ``x``, each normalized with a per-column
    affine: ``y`` (like ``x``) and the rows' statistics, one float64 ``(2, R)`` block of ``centre`` and ``rstd``
    (``R = x.numel() / d``; one allocation, one tensor to save)."""
    d = x.shape[-1] if d is None else d
    numel, dtype = x.numel(), x.dtype
    r = numel // d
    y = torch.empty_like(x)
    stats = torch.empty(2, r, dtype=torch.float64)
    p = stats.data_ptr()
    a = _ARITH[dtype]
    (g, gt), (b, bt) = _typed_param(weight, d, a), _typed_param(bias, d, a)
    _fn("rownorm_forward", dtype)(x.data_ptr(), y.data_ptr(), r, d, _ptr(g), gt, _ptr(b), bt, float(eps), int(rms),
                                  p, p + 8 * r, _threads(numel))
    return y, stats


def rownorm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor, rms: bool,
                     dgamma: bool = True, dbeta: bool = True, d: Optional[int] = None,
                     bias_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``dx`` (like ``x``), and where asked for the column sums ``dgamma = sum dy * x_hat``, ``dbeta = sum dy``
    (``(D,)``, in the weight's and ``bias_dtype`` as :func:`batch_backward`), from :func:`rownorm_forward`'s
    statistics block. Rows as there."""
    d = x.shape[-1] if d is None else d
    numel, dtype = x.numel(), x.dtype
    r = numel // d
    if stats.shape != (2, r) or stats.dtype != torch.float64 or not stats.is_contiguous():
        raise ValueError(f"rownorm_backward: stats must be rownorm_forward's contiguous float64 (2, {r}) block, "
                         f"got {stats.dtype} {tuple(stats.shape)}")
    if dy.dtype != dtype or not dy.is_contiguous():
        dy = dy.to(dtype).contiguous()
    dx = torch.empty_like(x)
    a = _ARITH[dtype]
    g, gt = _typed_param(weight, d, a)
    dg, gt = _grad_out(dgamma, d, _CODE_DTYPES.get(gt), gt, a)
    db, bt = _grad_out(dbeta, d, bias_dtype, 0, a)
    p = stats.data_ptr()
    _fn("rownorm_backward", dtype)(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), r, d, _ptr(g), gt, int(rms),
                                   p, p + 8 * r, _ptr(dg), _ptr(db), bt, _threads(numel))
    return dx, dg, db


__all__ = ["library", "declared", "BufferViews", "status", "set_stream_min", "supports", "layout", "moments", "affine", "grad_sums",
           "affine_grad", "rownorm_forward", "rownorm_backward", "group_forward", "group_backward", "batch_forward",
           "batch_renorm_forward", "batch_merged_forward", "batch_backward", "running_update_applies", "wake_workers", "pool_state", "set_threads", "threads",
           "PARALLEL_THRESHOLD"]
