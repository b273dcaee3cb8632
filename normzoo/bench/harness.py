"""How the benchmark times things: allocator, threads, interleaved rounds, medians, machine load.

Normalization is bound by memory traffic, and on a shared machine the noise is larger than many of the
differences we want to see. The rules this module implements (see DESIGN.md, "Measuring performance"):

* **Allocator.** A fresh large allocation from glibc costs page faults (``mmap`` of new zeroed pages) that
  can exceed the arithmetic. :func:`configure_allocator` ("tuned") makes glibc serve every block from its
  heap (``M_MMAP_MAX = 0``) and keep freed memory (``M_TRIM_THRESHOLD``, ``M_TOP_PAD``), so after warm-up
  every contender reuses warm pages, as a long training run does. The setting lasts for the process.
* **Threads.** :func:`torch_threads` fixes ``torch.set_num_threads`` for the run and restores it after.
* **Interleaved rounds.** :func:`interleaved` runs the contenders in rounds, every round in another order
  (:func:`round_order`: over ``n`` rounds -- ``2n`` for an odd count -- each contender comes right after each
  other one equally often), so slow drifts in the machine's load hit every contender alike, and so does what
  the previous call leaves in the caches and thread pools; the statistic is the median. (A plain rotation,
  A,B,C then B,C,A, keeps every contender behind the same one: measured on 2 cores, the same BatchNorm layer's
  forward took 53 or 72 us at 2x8x4x4 depending on which contender it followed.)
  Cheap contenders may be called a few times in a row per round (``max_repeats``: more samples for the same
  time, but on caches their own previous call warmed; ``normzoo bench`` calls every contender once). A short
  untimed pause before each call lets every contender's worker threads go to sleep first, so none is slowed
  by another's spinning threads (:data:`SETTLE_S`).
* **Load.** :class:`CpuMeter` measures how much CPU *other* processes used while we ran (from
  ``/proc/stat`` minus our own CPU time), next to ``os.getloadavg()``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from normzoo import native_ops
from normzoo._autograd import lean_apply, once_differentiable

ALLOCATOR_MODES = ("tuned", "default")
#: Untimed pause before each timed call (seconds): longer than the 100 us that normzoo's native worker
#: threads spin after a kernel, so that no contender runs while another's threads still spin.
SETTLE_S = 300e-6

# glibc mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_allocator_state: Optional[Dict[str, object]] = None


def configure_allocator(mode: str = "tuned") -> Dict[str, object]:
    """Fix the C allocator's behaviour for the rest of the process and describe what was done.

    ``"tuned"``: with glibc, ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, not fresh
    ``mmap`` pages), ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` and ``mallopt(M_TOP_PAD, 64 MiB)`` (freed memory
    stays with the process). With ``LD_PRELOAD`` of jemalloc/tcmalloc, or a non-glibc C library, nothing
    is changed and the description says so. ``"default"``: leave the allocator alone.
    Returns ``{"mode", "applied", "detail"}``; once ``"tuned"`` was applied it stays applied.
    """
    global _allocator_state
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"normzoo bench: allocator must be one of {ALLOCATOR_MODES}, got {mode!r}")
    preload = os.environ.get("LD_PRELOAD", "")
    if mode == "default":
        detail = "allocator left as the process found it"
        if _allocator_state is not None and _allocator_state.get("applied"):
            detail += " (tuned glibc settings from an earlier run in this process still apply)"
        return {"mode": "default", "applied": False, "detail": detail + (f"; LD_PRELOAD={preload}" if preload else "")}
    if _allocator_state is not None:
        return dict(_allocator_state)
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        state = {"mode": "tuned", "applied": False, "detail": f"LD_PRELOAD={preload}: using that allocator as is"}
    elif not sys.platform.startswith("linux"):
        state = {"mode": "tuned", "applied": False, "detail": f"no glibc on {sys.platform}: allocator left alone"}
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            ok = all(mallopt(param, value) == 1 for param, value in
                     ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))
            detail = ("glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=1GiB, M_TOP_PAD=64MiB" if ok
                      else "glibc mallopt refused a setting; allocator partly default")
            state = {"mode": "tuned", "applied": ok, "detail": detail}
        except (OSError, AttributeError) as exc:
            state = {"mode": "tuned", "applied": False, "detail": f"mallopt unavailable ({exc}); allocator default"}
    _allocator_state = state
    return dict(state)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: keep the current count)."""
    before = torch.get_num_threads()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"normzoo bench: threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect once, then keep Python's cyclic GC from firing inside timed code."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


Contender = Callable[[], object]


def interleaved(contenders: Mapping[str, Contender], rounds: int, warmup: int = 1,
                budget_s: Optional[float] = None, min_rounds: int = 1,
                max_repeats: int = 8, settle_s: float = 0.0) -> Dict[str, List[float]]:
    """Time the contenders in interleaved rounds; return every timed call, in seconds.

    Round ``r`` runs the contenders in the order :func:`round_order` gives, each call timed alone with
    ``time.perf_counter``. ``warmup`` untimed rounds come first (page faults,
    lazy initialisation, caches). From one call of each contender (the last warm-up round, or the first
    timed round when ``warmup=0``) a cheap contender is then called up to ``max_repeats`` times in a row per
    round (:func:`plan_repeats`), so that a 1 ms copy gets as many samples as fit beside a 100 ms layer and
    one scheduler stall cannot decide its median; and with ``budget_s`` the number of rounds is as many as
    fit in ``budget_s``, clamped to ``[min_rounds, rounds]`` (otherwise ``rounds``).
    ``settle_s``: an untimed pause before every call, so that worker threads another contender left spinning
    (normzoo's spin for 100 us after a kernel) have gone to sleep: no contender starts while another's threads
    still hold a core, and each starts with its thread pool as cold as after a layer of other work.
    Returns ``{name: [t_call0, t_call1, ...]}`` (at least one sample per round per name).
    """
    names = list(contenders)
    if not names:
        raise ValueError("normzoo bench: interleaved() needs at least one contender")
    if rounds < 1 or min_rounds < 1 or warmup < 0 or max_repeats < 1:
        raise ValueError(f"normzoo bench: need rounds >= 1, min_rounds >= 1, warmup >= 0, max_repeats >= 1; "
                         f"got rounds={rounds}, min_rounds={min_rounds}, warmup={warmup}, max_repeats={max_repeats}")
    times: Dict[str, List[float]] = {name: [] for name in names}

    def one_round(r: int, repeats: Mapping[str, int], record: bool) -> Dict[str, float]:
        last = {}
        for name in (names[i] for i in round_order(len(names), r)):
            fn = contenders[name]
            for _ in range(repeats[name]):
                if settle_s > 0:
                    time.sleep(settle_s)
                start = time.perf_counter()
                fn()
                last[name] = time.perf_counter() - start
                if record:
                    times[name].append(last[name])
        return last

    def plan(one_call: Mapping[str, float]) -> Tuple[Dict[str, int], int]:
        repeats = plan_repeats(one_call, max_repeats)
        if budget_s is None:
            return repeats, rounds
        return repeats, plan_rounds(sum(one_call[n] * repeats[n] for n in names), budget_s, min_rounds, rounds)

    single = {name: 1 for name in names}
    with gc_paused():
        warm: Dict[str, float] = {}
        for w in range(warmup):
            warm = one_round(w, single, record=False)
        if warm:
            repeats, n = plan(warm)
            start_round = 0
        else:  # the first timed round sizes the others
            repeats, n = plan(one_round(0, single, record=True))
            start_round = 1
        for r in range(start_round, n):
            one_round(r, repeats, record=True)
    return times


def round_order(n: int, r: int) -> List[int]:
    """The order of ``n`` contenders in round ``r``: the rows of a Williams design, in which over ``n`` rounds
    (``2n`` for odd ``n``) each contender comes right after each other one exactly once (for odd ``n``: twice): row
    ``r`` is ``0, 1, n-1, 2, n-2, ...`` shifted by ``r``, modulo ``n``, and for odd ``n`` the rows from ``n`` on
    are reversed."""
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    row = [(b + r) % n for b in base]
    return row[::-1] if n % 2 and (r // n) % 2 else row


def plan_repeats(warm_s: Mapping[str, float], max_repeats: int = 8, extra: float = 0.5) -> Dict[str, int]:
    """Calls per round for each contender, from one warm call each: ``floor(extra * R / (n * t_i))``
    clamped to ``[1, max_repeats]``, with ``R`` the sum of the warm times and ``n`` the number of
    contenders, so the repeats add at most ``extra`` (50%) to a round."""
    total, n = sum(warm_s.values()), len(warm_s)
    out = {}
    for name, t in warm_s.items():
        reps = int(extra * total / (n * t)) if t > 0 else max_repeats
        out[name] = max(1, min(max_repeats, reps))
    return out


def plan_rounds(round_s: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many rounds of ``round_s`` seconds fit in ``budget_s``, clamped to ``[min_rounds, max_rounds]``."""
    if round_s <= 0:
        return max_rounds
    return max(min_rounds, min(max_rounds, int(budget_s // round_s)))


def median(values: Sequence[float]) -> float:
    """The median (``statistics.median``); raises ``ValueError`` on an empty sequence."""
    if not values:
        raise ValueError("normzoo bench: median of no timings")
    return float(statistics.median(values))


def copy_contender(x: torch.Tensor) -> Tuple[Contender, int]:
    """A contender that copies ``x`` into a preallocated tensor of the same layout, and the bytes it moves.

    The copy reads and writes ``x.numel() * x.element_size()`` bytes each, so bandwidth = 2 * bytes / time.
    """
    src = x.detach()
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


class _EmptyOp(torch.autograd.Function):
    """An autograd op that does nothing but make its outputs: forward ``y`` like ``x`` (saving ``x`` and the
    parameters, as a normalization layer does), backward ``dx`` like ``dy`` and one gradient like each parameter."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *params)  # type: ignore[attr-defined]
        return torch.empty_like(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: object, dy: torch.Tensor) -> Tuple[torch.Tensor, ...]:  # type: ignore[override]
        x, *params = ctx.saved_tensors  # type: ignore[attr-defined]
        return (torch.empty_like(dy), *(torch.empty_like(p) for p in params))


_empty_apply = lean_apply(_EmptyOp)


def empty_step_contender(x: torch.Tensor, dy: torch.Tensor, params: Sequence[torch.Tensor],
                         compiled: bool = False) -> Contender:
    """The forward+backward step of an op that does no work, on ``x`` with ``dy`` and gradients for ``params``,
    timed as a layer's step is: what a layer pays per step before its kernels run (the autograd engine, the
    allocation of its outputs, and for a Python op its calls into Python), the fixed cost that dominates small
    tensors. ``compiled``: the op with its autograd in C++ (``torch.ops.normzoo.empty_step``, for layers on the
    compiled operators of :mod:`normzoo.native_ops`; up to 4 parameters); else :class:`_EmptyOp`, a Python autograd
    op applied as normzoo's Python ops are."""
    inputs = (x, *params)
    ops = native_ops.ops() if compiled and len(params) <= 4 else None
    if ops is not None:
        padded = (*params, *(None,) * (4 - len(params)))
        empty_op = ops.empty_step

        def compiled_step() -> object:
            return torch.autograd.grad(empty_op(x, *padded), inputs, dy)

        return compiled_step

    def step() -> object:
        return torch.autograd.grad(_empty_apply(x, *params), inputs, dy)

    return step


def _proc_stat_busy() -> Optional[Tuple[float, float]]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``; ``None`` if unreadable."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [float(v) for v in fields[1:]]
    hz = float(os.sysconf("SC_CLK_TCK"))
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already inside user/nice
    return (total - idle) / hz, total / hz


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """How busy the machine was with *other* processes between :meth:`start` and :meth:`stop`.

    ``others_cores``: average number of cores other processes kept busy (machine busy time minus this
    process's CPU time, per wall second); ``None`` where ``/proc/stat`` is unavailable.
    ``loadavg``: ``os.getloadavg()`` at stop (1, 5, 15 min; includes this process's own threads).
    """

    others_cores: Optional[float] = None
    loadavg: Optional[Tuple[float, float, float]] = None
    _t0: float = 0.0
    _busy0: Optional[Tuple[float, float]] = None
    _own0: float = 0.0

    def start(self) -> "CpuMeter":
        self._t0, self._busy0, self._own0 = time.perf_counter(), _proc_stat_busy(), _own_cpu_s()
        return self

    def stop(self) -> "CpuMeter":
        wall = time.perf_counter() - self._t0
        busy1 = _proc_stat_busy()
        own = _own_cpu_s() - self._own0
        if self._busy0 is not None and busy1 is not None and wall > 0:
            self.others_cores = max(0.0, (busy1[0] - self._busy0[0] - own) / wall)
        self.loadavg = load_average()
        return self


def load_average() -> Optional[Tuple[float, float, float]]:
    """``os.getloadavg()`` rounded, or ``None`` where the platform has none."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def last_level_cache_bytes() -> Optional[int]:
    """Size of the largest CPU cache from sysfs (Linux), or ``None``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = None
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            size = int(digits) * scale
            best = size if best is None else max(best, size)
    return best


def machine_info() -> Dict[str, object]:
    """What the numbers depend on: CPU, cores, cache, torch version and build, threads."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


__all__ = ["ALLOCATOR_MODES", "configure_allocator", "torch_threads", "gc_paused", "interleaved", "round_order",
           "plan_repeats", "plan_rounds", "median", "copy_contender", "empty_step_contender", "CpuMeter", "load_average",
           "last_level_cache_bytes", "machine_info"]
