"""``normzoo.bench.run``: measure every selected layer next to its baseline and return structured results.

Per (layer, shape, memory format) a **group** is timed: for every dtype, normzoo's module forward and
forward+backward, the baseline's forward+backward (the targets' measure; timing its forward alone too
would add a third to the cost of the slowest contenders, the paper formulas), a copy of the input (the
machine's bandwidth at that size), the step of an autograd op that does no work (the fixed cost of a layer written
as one, :func:`normzoo.bench.harness.empty_step_contender`), and for the BatchNorm family normzoo's BatchNorm
forward+backward, all in one set of interleaved rounds (:func:`normzoo.bench.harness.interleaved`). Modules
are in training mode; "forward" is the training forward (autograd recording, graph dropped), "forward+backward" is
``y = m(x); torch.autograd.grad(y, (x, *params), dy)`` with a fixed ``dy``. Inputs, ``dy`` and the copy
target are allocated once per group and reused; every contender runs once while the group is prepared
(first calls, page faults), so by default no further warm-up round is needed.

With ``mode="eval"`` every module (normzoo's, the baseline, the BatchNorm reference) first runs one training
forward on the group's input, so that its running statistics are the data's, and is then timed in eval mode: the
forward with the running statistics, forward+backward as above (fine-tuning with fixed statistics).

Every contender is called once per round (:data:`CALLS_PER_ROUND`), the copy included, so that all of them
run under the same conditions: after the same pause, behind another contender. A cheap contender called
several times in a row runs its later calls on caches its own previous call left warm; with that, the copy's
bandwidth at one tensor size had come out 16 to 29 GB/s (8x256x14x14 float32, 2 threads) depending on which
contenders shared its group, and a layer next to a slow paper-formula baseline had more such calls than one next
to torch's.

The time budget is shared out over the groups, cheapest first, so that what a small group leaves
unused goes to the big ones; each group gets at least ``min_rounds`` and at most ``rounds`` rounds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from normzoo import native, native_ops
from normzoo.bench import cases, environment, harness
from normzoo.bench.cases import LayerSpec, Shape
from normzoo.bench.memory import count_saved
from normzoo.bench.results import Row, Timing
from normzoo.bench.targets import checks, summary

#: Calls of each contender per timed round (see the module doc): one, the same for all.
CALLS_PER_ROUND = 1

Progress = Callable[[str], None]


@dataclass
class BenchResult:
    """Everything one run measured: ``rows`` (see :class:`normzoo.bench.results.Row`), ``skipped`` layers
    with the reason, and ``meta`` (machine, settings, allocator, load, wall time)."""

    rows: List[Row] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        rows = []
        for row in self.rows:
            d = row.to_dict()
            d["targets"] = [c.to_dict() for c in checks(row)]
            rows.append(d)
        return {"meta": self.meta, "rows": rows, "skipped": self.skipped, "targets": summary(self.rows)}

    def table(self) -> str:
        from normzoo.bench.report import format_table

        return format_table(self)

    def write(self, out_dir: str, plot: bool = True) -> Dict[str, str]:
        """Write ``results.json``, ``results.txt`` (the table) and ``results.png`` into ``out_dir``."""
        from normzoo.bench.report import write_all

        return write_all(self, out_dir, plot=plot)


@dataclass
class _Member:
    """One dtype's modules and tensors inside a group."""

    row: Row
    subject: Optional[nn.Module] = None
    baseline: Optional[nn.Module] = None
    reference: Optional[nn.Module] = None
    x: Optional[torch.Tensor] = None
    dy: Optional[torch.Tensor] = None


def _autograd_of(y: torch.Tensor) -> str:
    """``"C++"`` where ``y`` came from a compiled operator's node (or torch's own), ``"Python"`` from a Python
    ``autograd.Function``."""
    return "Python" if hasattr(y.grad_fn, "_forward_cls") else "C++"  # (a Python Function's node knows its class)


def _trainable(module: nn.Module) -> List[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    inputs = (x, *_trainable(module))

    def step() -> object:
        y = module(x)
        return torch.autograd.grad(y, inputs, dy, allow_unused=True)

    return step


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    if a.shape != b.shape:
        return None
    return float((a.detach().float() - b.detach().float()).abs().max())


def _prepare(spec: LayerSpec, shape: Shape, dtype: str, fmt: str, seed: int, llc: Optional[int],
             mode: str = "train") -> _Member:
    tdtype = cases.DTYPES[dtype]
    row = Row(layer=spec.name, kind=spec.kind, shape=list(shape), dtype=dtype, memory_format=fmt,
              baseline_kind=spec.baseline_kind, baseline_label=spec.baseline_label,
              element_size=torch.empty((), dtype=tdtype).element_size(), note=spec.note, mode=mode)
    row.cache_resident = llc is not None and 2 * row.tensor_bytes <= llc
    m = _Member(row)
    c = spec.channels(shape)
    stage = "building the layer"
    try:
        gen = torch.Generator().manual_seed(seed)
        subject = spec.make(c)
        stage = "building the baseline"
        baseline = spec.make_baseline(subject, c)
        stage = "building the BatchNorm reference"
        reference = spec.make_reference(c) if spec.make_reference is not None else None
        for mod in (subject, baseline, reference):
            if mod is not None:
                mod.to(tdtype).train()
        x = cases.make_input(shape, tdtype, fmt, gen)
        if mode == "eval":
            stage = "the training forward before eval"
            for mod in (subject, baseline, reference):
                if mod is not None:
                    with torch.no_grad():
                        mod(x)  # running statistics from the data
                    mod.eval()
        stage = "the first forward"  # (counting what it saves for backward)
        row.saved, y = count_saved(lambda: subject(x), subject, inputs=[x])
        row.autograd = _autograd_of(y)
        stage = "the baseline's first forward"
        row.saved_baseline, y_base = count_saved(lambda: baseline(x), baseline, inputs=[x])
        row.max_abs_diff = _max_abs_diff(y, y_base)
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(tdtype)
        dy = torch.empty_like(y).copy_(dy)  # same layout as the output
        del y, y_base  # and their graphs
        stage = "the first backward"
        _train_step(subject, x, dy)()
        stage = "the baseline's first backward"
        _train_step(baseline, x, dy)()
        if reference is not None:
            stage = "the BatchNorm reference"
            _train_step(reference, x, dy)()
        m.subject, m.baseline, m.reference, m.x, m.dy = subject, baseline, reference, x, dy
    except Exception as exc:  # a layer that cannot run this case is reported, not fatal
        row.error = f"{stage}: {type(exc).__name__}: {exc}"
    return m


def _contenders(members: Sequence[_Member]) -> Dict[str, Callable[[], object]]:
    out: Dict[str, Callable[[], object]] = {}
    for m in members:
        if m.row.error is not None:
            continue
        dt, x, dy = m.row.dtype, m.x, m.dy
        assert m.subject is not None and m.baseline is not None and x is not None and dy is not None
        subject, baseline = m.subject, m.baseline
        out[f"{dt}/normzoo/fwd"] = lambda s=subject, x=x: s(x)
        out[f"{dt}/normzoo/fb"] = _train_step(subject, x, dy)
        out[f"{dt}/baseline/fb"] = _train_step(baseline, x, dy)
        copy = harness.copy_contender(x)[0]
        copy()  # touch the destination's pages before timing
        out[f"{dt}/copy"] = copy
        empty = harness.empty_step_contender(x, dy, _trainable(subject), compiled=m.row.autograd == "C++")
        empty()
        out[f"{dt}/empty/fb"] = empty
        if m.reference is not None:
            out[f"{dt}/reference/fb"] = _train_step(m.reference, x, dy)
    return out


def _fill(members: Sequence[_Member], times: Dict[str, List[float]], rounds: int, others: Optional[float]) -> None:
    med = {k: harness.median(v) for k, v in times.items() if v}
    fp32 = med.get("float32/normzoo/fb")
    for m in members:
        row = m.row
        if row.error is not None:
            continue
        dt = row.dtype
        row.normzoo = Timing(med[f"{dt}/normzoo/fwd"], med[f"{dt}/normzoo/fb"], times[f"{dt}/normzoo/fwd"],
                             times[f"{dt}/normzoo/fb"])
        row.baseline = Timing(fb_s=med[f"{dt}/baseline/fb"], fb_runs=times[f"{dt}/baseline/fb"])
        row.copy_s = med[f"{dt}/copy"]
        row.empty_fb_s = med.get(f"{dt}/empty/fb")
        row.reference_fb_s = med.get(f"{dt}/reference/fb")
        row.fp32_fb_s = fp32 if dt != "float32" else None
        row.rounds = rounds
        row.others_cores = others


def run(layers: Optional[Sequence[str]] = None, shapes: Optional[Sequence[Sequence[int]]] = None,
        dtypes: Optional[Sequence[str]] = None, memory_formats: Optional[Sequence[str]] = None, *,
        threads: Optional[int] = 2, rounds: int = 15, min_rounds: int = 3, warmup: int = 0,
        budget_s: Optional[float] = 25.0, allocator: str = "tuned", quick: bool = False,
        specs: Optional[Sequence[LayerSpec]] = None, seed: int = 0,
        progress: Optional[Progress] = None, mode: str = "train") -> BenchResult:
    """Benchmark normzoo's layers against torch.nn / paper-formula baselines; return a :class:`BenchResult`.

    ``layers``: registry names (default :data:`normzoo.bench.cases.DEFAULT_LAYERS`, ``["all"]`` for every
    registered layer the benchmark knows); ``specs`` replaces them with ready-made
    :class:`~normzoo.bench.cases.LayerSpec` s. ``shapes``: default ``(32, 64, 56, 56)``, ``(8, 256, 14, 14)``
    and ``(8, 512, 768)``; each layer takes those of its rank (see :func:`normzoo.bench.cases.shapes_for`).
    ``dtypes``: names, default float32 and bfloat16. ``memory_formats``: ``"contiguous"``,
    ``"channels_last"`` (default both). ``threads``: torch threads during the run (restored after; ``None``
    keeps the current count). ``rounds``/``min_rounds``: bounds on timed rounds per group, ``warmup``
    untimed rounds first (default 0: every contender has already run once while the group was prepared), ``budget_s`` seconds of timed rounds shared over all groups (``None``: always
    ``rounds``). ``allocator``: ``"tuned"`` or ``"default"`` (see
    :func:`normzoo.bench.harness.configure_allocator`). ``quick``: float32 unless ``dtypes`` are given, at most
    3 rounds (at least 2) and at most a 5 s budget. ``progress``: called with one line per group. ``mode``:
    ``"train"`` (the issue's targets) or ``"eval"`` (see the module doc).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"normzoo bench: mode must be 'train' or 'eval', got {mode!r}")
    if quick:
        dtypes = dtypes or ("float32",)
        rounds, min_rounds = min(rounds, 3), min(min_rounds, 2)
        budget_s = 5.0 if budget_s is None else min(budget_s, 5.0)
    if rounds < 1 or min_rounds < 1 or warmup < 0:
        raise ValueError(f"normzoo bench: need rounds >= 1, min_rounds >= 1 and warmup >= 0; got "
                         f"rounds={rounds}, min_rounds={min_rounds}, warmup={warmup}")
    dtype_names = [cases.parse_dtype(d) for d in (dtypes or cases.DEFAULT_DTYPES)]
    dtype_names = list(dict.fromkeys(dtype_names))
    # float32 first so that the bf16/fp32 ratio has its denominator in the same rounds
    dtype_names.sort(key=lambda d: d != "float32")
    formats = [cases.parse_format(f) for f in (memory_formats or cases.DEFAULT_FORMATS)]
    shape_list = [tuple(int(s) for s in shape) for shape in (shapes or cases.DEFAULT_SHAPES)]
    for shape in shape_list:
        if not 2 <= len(shape) <= 5 or any(s <= 0 for s in shape):
            raise ValueError(f"normzoo bench: shapes must have 2 to 5 positive sizes, got {shape}")

    result = BenchResult()
    if specs is None:
        selection = cases.select_layers(layers)
        specs, result.skipped = selection.specs, selection.skipped
    groups: List[Tuple[LayerSpec, Shape, str]] = []
    for spec in specs:
        spec_shapes = cases.shapes_for(spec, shape_list)
        if not spec_shapes:
            result.skipped.append({"layer": spec.name, "reason": f"no shape of rank {spec.rank} given or derivable"})
        for shape in spec_shapes:
            for fmt in cases.formats_for(spec, formats):
                groups.append((spec, shape, fmt))

    alloc = harness.configure_allocator(allocator)
    llc = harness.last_level_cache_bytes()
    started, wall0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    whole = harness.CpuMeter().start()
    load_before = harness.load_average()
    rows_by_group: Dict[int, List[Row]] = {}
    with harness.torch_threads(threads) as n_threads:
        order = sorted(range(len(groups)), key=lambda i: _cost(groups[i][1], len(dtype_names)))
        budget_left = budget_s
        for done, i in enumerate(order):
            spec, shape, fmt = groups[i]
            t0 = time.perf_counter()
            members = [_prepare(spec, shape, dt, fmt, seed, llc, mode) for dt in dtype_names]
            contenders = _contenders(members)
            share = None if budget_left is None else max(budget_left, 0.0) / (len(order) - done)
            if contenders:
                meter = harness.CpuMeter().start()
                t_timed = time.perf_counter()
                times = harness.interleaved(contenders, rounds, warmup, budget_s=share, min_rounds=min_rounds,
                                            max_repeats=CALLS_PER_ROUND, settle_s=harness.SETTLE_S)
                timed = time.perf_counter() - t_timed
                n_rounds = min(len(v) for v in times.values())
                if budget_left is not None:
                    budget_left -= timed
                _fill(members, times, n_rounds, meter.stop().others_cores)
            rows_by_group[i] = [m.row for m in members]
            del members, contenders
            if progress is not None:
                errors = sum(r.error is not None for r in rows_by_group[i])
                progress(f"[{done + 1}/{len(order)}] {spec.name} {'x'.join(map(str, shape))} {fmt}: "
                         f"{time.perf_counter() - t0:.1f} s" + (f", {errors} failed" if errors else ""))
    whole.stop()
    result.rows = [row for i in range(len(groups)) for row in rows_by_group.get(i, [])]
    result.meta = {
        "started": started,
        "wall_s": round(time.perf_counter() - wall0, 2),
        "threads": n_threads,
        "allocator": alloc,
        "omp_wait": environment.omp_wait_info(),
        "kernel_threads": native.threads(),
        "autograd_ops": native_ops.status() + (f", called {native_ops.entries()}" if native_ops.ops() else ""),
        "machine": harness.machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": whole.loadavg,
        "others_cores": whole.others_cores,
        "settings": {"layers": [s.name for s in specs], "shapes": [list(s) for s in shape_list],
                     "dtypes": dtype_names, "memory_formats": formats, "rounds": rounds, "min_rounds": min_rounds,
                     "warmup": warmup, "budget_s": budget_s, "quick": quick, "seed": seed, "mode": mode},
        "method": (f"{'training' if mode == 'train' else 'eval'} mode; medians of interleaved rounds, each call after "
                   f"an untimed pause of {harness.SETTLE_S * 1e6:.0f} us (thread pools asleep); forward = "
                   f"{'training' if mode == 'train' else 'eval'} forward with autograd "
                   "recording; forward+backward = forward + torch.autograd.grad w.r.t. input and parameters; "
                   "bandwidth floor 2 x bytes forward, 5 x bytes forward+backward; copy = Tensor.copy_ into a "
                   "preallocated tensor of the same size and layout, 2 x bytes"),
    }
    return result


def _cost(shape: Shape, n_dtypes: int) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * n_dtypes


__all__ = ["BenchResult", "run"]
