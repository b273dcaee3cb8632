"""Running experiments: the experiment record, progress display, results file, resume.

An experiment is a :class:`Experiment`: a finding (the claim it tests), a checkable criterion, a ``run``
function that turns a :class:`Context` (quick or full, seed, size scale) into a dict of plain numbers,
a ``judge`` that reads the verdict off those numbers, and a ``plot`` that draws them. Everything the
report shows comes from the numbers, so ``normzoo lab report DIR`` rebuilds the page and the figures
from ``results.json`` alone.

Results file (``DIR/results.json``): ``{"format": "normzoo-lab/1", "experiments": {name: result}}``,
rewritten atomically (temporary file + rename) after every finished experiment, so an interrupted run
loses at most the experiment in progress. Running again into the same folder skips experiments already
finished with the same settings (quick/full, seed, scale); pending and failed ones run again. A file that
cannot be read as a results file is moved aside to ``results.json.corrupt`` (``.corrupt.1``, ...) with a
message, never overwritten.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

from . import models
from .train import single_thread

__all__ = ["VERDICTS", "Experiment", "Context", "WorkerPool", "Result", "Progress", "CorruptResults", "run_experiment",
           "run_experiments", "load_results", "save_results", "default_scale", "RESULTS_FILE", "FORMAT"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "pending", "error")
RESULTS_FILE = "results.json"
FORMAT = "normzoo-lab/1"


@dataclass(frozen=True)
class Experiment:
    """One experiment: what it claims, how it is judged, how it runs and how it is drawn."""

    name: str
    title: str
    finding: str
    criterion: str
    source: str
    run: Callable[["Context"], Dict[str, Any]]
    judge: Callable[[Dict[str, Any]], Tuple[str, str]]
    plot: Callable[[Dict[str, Any], Any], None]
    requires: Tuple[str, ...] = ()
    figsize: Tuple[float, float] = (11.0, 4.0)


def default_scale() -> float:
    """The size scale from ``NORMZOO_LAB_SCALE`` (default 1.0); tests use small values for tiny runs."""
    raw = os.environ.get("NORMZOO_LAB_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"NORMZOO_LAB_SCALE must be a number in (0, 1], got {raw!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"NORMZOO_LAB_SCALE must be in (0, 1], got {value}")
    return value


class Progress:
    """A one-line progress display on stderr.

    On a terminal the line ``[i/n] name [####....] done/total runs  12.3s`` is redrawn in place (and its
    clock once a second by a daemon thread while an experiment runs); otherwise (a log file, CI) only one
    plain line per experiment start and finish is written.
    """

    def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True, tick: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._label = ""
        self._t0 = time.monotonic()
        self._last = 0.0
        self._width = 0
        self._state: Tuple[int, int, str] = (0, 0, "")
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._tick = tick
        self._thread: Optional[threading.Thread] = None

    def _write(self, text: str, newline: bool) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.tty:
                pad = max(self._width - len(text), 0)
                self.stream.write("\r" + text + " " * pad + ("\n" if newline else ""))
                self._width = 0 if newline else len(text)
            elif newline:
                self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        done, total, note = self._state
        frac = done / total if total else 0.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        self._write(f"{self._label} [{bar}] {done}/{total} {note} {time.monotonic() - self._t0:6.1f}s", newline=False)

    def _ticker(self) -> None:
        while not self._running.wait(self._tick):
            self._draw()

    def start(self, index: int, total: int, name: str) -> None:
        self._label = f"[{index}/{total}] {name}"
        self._t0 = time.monotonic()
        self._state = (0, 0, "")
        self._write(f"{self._label} ...", newline=not self.tty)
        if self.tty and self._thread is None:
            self._running.clear()
            self._thread = threading.Thread(target=self._ticker, daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the clock thread (idempotent)."""
        self._stop()

    def _stop(self) -> None:
        if self._thread is not None:
            self._running.set()
            self._thread.join()
            self._thread = None

    def update(self, done: int, total: int, note: str = "") -> None:
        self._state = (done, total, note)
        if not self.tty:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        self._draw()

    def finish(self, result: "Result") -> None:
        self._stop()
        extra = f" (needs {', '.join(result.missing)})" if result.missing else ""
        self._write(f"{self._label}: {result.verdict}{extra}  {result.elapsed_s:.1f}s", newline=True)

    def message(self, text: str) -> None:
        self._stop()
        if self.enabled:
            with self._lock:
                if self.tty and self._width:
                    self.stream.write("\n")
                    self._width = 0
                self.stream.write(text + "\n")
                self.stream.flush()


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_thread()


def _call(job: Tuple[Callable[..., Any], Dict[str, Any]]) -> Any:
    fn, kwargs = job
    return fn(**kwargs)


class WorkerPool:
    """A lazily started pool of ``size`` spawned worker processes (one torch thread each), shared by the
    experiments of one run; ``close()`` ends it."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"normzoo.lab: workers must be >= 1, got {size}")
        self.size = int(size)
        self._pool: Any = None

    def imap(self, fn: Callable[..., Any], jobs: Sequence[Dict[str, Any]]) -> Iterable[Any]:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.size, initializer=_worker_init)
        return self._pool.imap(_call, [(fn, kw) for kw in jobs])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class Context:
    """What an experiment's ``run`` gets: the settings, sizing helpers, progress and a parallel map.

    - ``quick`` / ``seed`` / ``scale`` -- the settings; ``scale`` in (0, 1] shrinks step counts for tests
      (and, below 0.25, thins sweeps: :meth:`thin`).
    - :meth:`steps` -- a step count for quick or full, times ``scale``.
    - :meth:`map` -- ``fn(**kwargs)`` for each job, in the worker processes of ``pool`` when it has more than
      one (each job seeds itself, so the results do not depend on the number of workers); ``fn`` must be a
      module-level function.
    - :meth:`plan` / :meth:`advance` -- progress units for work not done through :meth:`map`.
    """

    def __init__(self, quick: bool = True, seed: int = 0, scale: float = 1.0, pool: Optional[WorkerPool] = None,
                 progress: Optional[Progress] = None) -> None:
        if not 0 < scale <= 1:
            raise ValueError(f"normzoo.lab: scale must be in (0, 1], got {scale}")
        self.quick, self.seed, self.scale = bool(quick), int(seed), float(scale)
        self.pool = pool
        self.progress = progress
        self.total = 0
        self.done = 0

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    def steps(self, quick: int, full: int, minimum: int = 4) -> int:
        return max(minimum, int(round(self.pick(quick, full) * self.scale)))

    def thin(self, values: Sequence[Any], minimum: int = 3) -> List[Any]:
        """``values`` as they are, or -- for smoke tests at ``scale < 0.25`` -- an evenly spaced subset of
        ``max(minimum, len * 4 * scale)`` of them, first and last included (just the first when that is 1)."""
        values = list(values)
        k = max(minimum, int(round(len(values) * 4 * self.scale)))
        if self.scale >= 0.25 or k >= len(values):
            return values
        if k == 1:
            return values[:1]
        return [values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)]

    def plan(self, units: int) -> None:
        self.total += int(units)
        self._show("")

    def advance(self, units: int = 1, note: str = "") -> None:
        self.done += int(units)
        self._show(note)

    def _show(self, note: str) -> None:
        if self.progress is not None:
            self.progress.update(self.done, self.total, note)

    def map(self, fn: Callable[..., Any], jobs: Sequence[Dict[str, Any]], note: str = "runs") -> List[Any]:
        jobs = list(jobs)
        self.plan(len(jobs))
        out: List[Any] = []
        if self.pool is not None and self.pool.size > 1 and len(jobs) > 1:
            for value in self.pool.imap(fn, jobs):
                out.append(value)
                self.advance(1, note)
        else:
            for kw in jobs:
                out.append(fn(**kw))
                self.advance(1, note)
        return out


@dataclass
class Result:
    """One experiment's outcome; :meth:`to_dict` is what ``results.json`` stores."""

    name: str
    title: str
    finding: str
    criterion: str
    source: str
    verdict: str
    reason: str
    numbers: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    figure: Optional[str] = None
    missing: List[str] = field(default_factory=list)
    error: Optional[str] = None
    finished: str = ""
    versions: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Result":
        if not isinstance(d, dict):
            raise TypeError(f"a result must be an object, got {type(d).__name__}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("name", "verdict"):
            if not isinstance(known.get(k), str):
                raise ValueError(f"result is missing its {k!r}")
        if known["verdict"] not in VERDICTS:
            raise ValueError(f"unknown verdict {known['verdict']!r}")
        known.setdefault("title", known["name"])
        for k in ("finding", "criterion", "source", "reason"):
            known.setdefault(k, "")
        return cls(**known)

    @property
    def finished_ok(self) -> bool:
        return self.verdict in ("reproduced", "not reproduced", "inconclusive")


def _versions() -> Dict[str, str]:
    import numpy
    import torch

    from normzoo import __version__
    return {"normzoo": __version__, "torch": torch.__version__, "numpy": numpy.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _base(exp: Experiment, config: Dict[str, Any]) -> Dict[str, Any]:
    return dict(name=exp.name, title=exp.title, finding=exp.finding, criterion=exp.criterion, source=exp.source,
                config=config, versions=_versions())


def _plain(value: Any) -> Any:
    """``value`` as strict JSON types: tuples become lists, numpy/torch scalars floats, NaN/inf ``None``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if hasattr(value, "item"):
        return _plain(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"normzoo.lab: experiment numbers must be plain JSON values, got {type(value).__name__}")


def _execute(exp: Experiment, ctx: Context) -> Result:
    """Run one experiment (exceptions propagate); a pending result when its layers are missing."""
    config = {"quick": ctx.quick, "seed": ctx.seed, "scale": ctx.scale}
    need = models.missing(exp.requires)
    if need:
        return Result(verdict="pending", reason=f"needs {', '.join(need)}, which normzoo does not provide yet; "
                      "the experiment runs as soon as it does", missing=need, finished=_now(), **_base(exp, config))
    single_thread()
    t0 = time.monotonic()
    numbers = exp.run(ctx)
    verdict, reason = exp.judge(numbers)
    if verdict not in VERDICTS:
        raise ValueError(f"experiment {exp.name!r}: judge returned unknown verdict {verdict!r}")
    numbers = _plain(numbers)
    return Result(verdict=verdict, reason=reason, numbers=numbers, elapsed_s=round(time.monotonic() - t0, 2),
                  finished=_now(), **_base(exp, config))


def run_experiment(name: str, quick: bool = True, seed: int = 0, scale: Optional[float] = None,
                   out: Optional[os.PathLike] = None, workers: int = 1) -> Result:
    """Run one experiment from Python and return its :class:`Result`.

    >>> r = run_experiment("saturation", quick=True, seed=0)
    >>> r.verdict, r.numbers["summary"]

    ``scale`` (default ``NORMZOO_LAB_SCALE`` or 1) shrinks the step counts; with ``out`` the result is also
    merged into ``out/results.json`` and its figure and the HTML page are written there.
    """
    from .experiments import get

    exp = get(name)
    pool = WorkerPool(workers)
    try:
        result = _execute(exp, Context(quick=quick, seed=seed, scale=default_scale() if scale is None else scale,
                                       pool=pool))
    finally:
        pool.close()
    if out is not None:
        from .report import draw_figure, write_html

        out = Path(out)
        results = load_results(out, on_corrupt="move")
        result.figure = draw_figure(exp, result, out)
        results[name] = result
        save_results(out, results)
        write_html(out, results)
    return result


class CorruptResults(Exception):
    """``results.json`` exists but cannot be read as a results file."""


def _results_path(out: Path) -> Path:
    return Path(out) / RESULTS_FILE


def load_results(out: os.PathLike, on_corrupt: str = "raise", warn: Optional[Callable[[str], None]] = None
                 ) -> Dict[str, Result]:
    """Read ``out/results.json`` (empty dict when absent).

    ``on_corrupt="raise"`` raises :class:`CorruptResults`; ``"move"`` renames the file to
    ``results.json.corrupt`` (or ``.corrupt.N``), reports it through ``warn`` (stderr by default) and
    returns an empty dict.
    """
    path = _results_path(Path(out))
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("experiments"), dict):
            raise ValueError(f"not a normzoo lab results file (expected format {FORMAT!r})")
        return {k: Result.from_dict(v) for k, v in raw["experiments"].items()}
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        problem = f"{path} is corrupt or incomplete ({exc.__class__.__name__}: {exc})"
        if on_corrupt == "raise":
            raise CorruptResults(problem) from exc
        aside = path.with_name(path.name + ".corrupt")
        n = 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.corrupt.{n}")
        path.rename(aside)
        (warn or (lambda m: print(m, file=sys.stderr)))(
            f"normzoo lab: {problem}; kept it as {aside} and starting a new results file")
        return {}


def save_results(out: os.PathLike, results: Dict[str, Result]) -> Path:
    """Write ``out/results.json`` atomically (a temporary file renamed over the old one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = _results_path(out)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"format": FORMAT, "experiments": {k: v.to_dict() for k, v in results.items()}}
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_experiments(names: Iterable[str], out: os.PathLike, quick: bool = True, seed: int = 0,
                    scale: Optional[float] = None, workers: int = 1, fresh: bool = False,
                    progress: Optional[Progress] = None) -> Dict[str, Result]:
    """Run ``names`` into ``out`` with resume; returns every result in the folder.

    Experiments already finished in ``out`` with the same settings are skipped (unless ``fresh``); each
    finished one is saved at once and the HTML page refreshed. An exception inside an experiment is recorded
    as verdict ``error`` (with its traceback) and the others still run; Ctrl-C stops after saving.
    """
    from .experiments import get
    from .report import draw_figure, write_html

    out = Path(out)
    progress = progress or Progress(enabled=False)
    exps = [get(n) for n in names]
    scale = default_scale() if scale is None else scale
    config = {"quick": bool(quick), "seed": int(seed), "scale": float(scale)}
    results = load_results(out, on_corrupt="move", warn=progress.message)
    out.mkdir(parents=True, exist_ok=True)
    pool = WorkerPool(workers)
    try:
        for i, exp in enumerate(exps, 1):
            old = results.get(exp.name)
            if not fresh and old is not None and old.finished_ok and old.config == config:
                progress.message(f"[{i}/{len(exps)}] {exp.name}: finished before ({old.verdict}), kept")
                continue
            progress.start(i, len(exps), exp.name)
            t0 = time.monotonic()
            try:
                result = _execute(exp, Context(quick=quick, seed=seed, scale=scale, pool=pool, progress=progress))
            except KeyboardInterrupt:
                progress.message(f"normzoo lab: interrupted during {exp.name}; finished experiments are saved "
                                 f"in {out / RESULTS_FILE}, run the same command again to resume")
                raise
            except Exception as exc:  # recorded, and the remaining experiments still run
                result = Result(verdict="error", reason=f"{exc.__class__.__name__}: {exc}",
                                error=traceback.format_exc(), elapsed_s=round(time.monotonic() - t0, 2),
                                finished=_now(), **_base(exp, config))
            result.figure = draw_figure(exp, result, out)
            results[exp.name] = result
            save_results(out, results)
            write_html(out, results)
            progress.finish(result)
    finally:
        progress.close()
        pool.close()
    write_html(out, results)
    return results
