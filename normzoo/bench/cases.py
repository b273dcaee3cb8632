"""What the benchmark runs: layers, the contender each is compared with, shapes, dtypes, memory formats.

Each benchmarked layer is a :class:`LayerSpec`: how to build normzoo's module (``normzoo.create(name, C)``;
Cross-Iteration BN with ``compensate=False``, since compensation needs the preceding layer attached),
how to build its **baseline** from it, and which input layout it takes.

Baselines (the ratio in the report is baseline time / normzoo time):

==========================  ===================================================================
normzoo name                baseline
==========================  ===================================================================
bn1d bn2d bn3d              ``torch.nn.BatchNorm1d/2d/3d(C)``
in1d in2d in3d              ``torch.nn.InstanceNorm1d/2d/3d(C, affine=True)``
gn                          ``torch.nn.GroupNorm(G, C)`` with normzoo's group count
ln2d                        ``torch.nn.GroupNorm(1, C)``: same statistics and per-channel affine.
                            (``torch.nn.LayerNorm([C, H, W])`` has a per-element affine: another layer.)
ln                          ``torch.nn.LayerNorm(D)`` over the last dim
rms                         ``torch.nn.RMSNorm(D)`` over the last dim, same ``eps``
syncbn                      ``torch.nn.SyncBatchNorm(C)`` (one process: BatchNorm of the local batch)
mbn* brn* bin* switch*      the paper's formula in plain autograd torch (:mod:`normzoo.bench.formulas`),
cbn* frn* evonorm_b0/_s0    built with the normzoo module's hyper-parameters where the names agree
syncmbn                     (``eps``, ``groups``, ``r_max``, ``d_max``, ``window``)
==========================  ===================================================================

Shapes. Image layers take ``(N, C, *S)``: ``*1d`` layers rank 3, ``*2d`` (and gn, ln2d, frn, evonorm,
syncbn, syncmbn) rank 4, ``*3d`` rank 5. Sequence layers (``ln``, ``rms``) take ``(N, L, D)`` and normalize ``D``. Each
layer gets the given shapes of its rank; when none has that rank they are derived from the given ones
(:func:`shapes_for`). ``channels_last`` means channels innermost in memory (``torch.channels_last`` for
rank 4, ``torch.channels_last_3d`` for rank 5, the ``(N, L, C)`` layout for rank 3); sequence layers are
already channels-last and run in the contiguous format only.

The BatchNorm-family layers (mean-only BN, Batch Renorm, Batch-Instance Norm, Switchable Norm, CBN) also
carry a **reference**: normzoo's own BatchNorm of the same rank, timed in the same rounds.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from normzoo.bench import formulas

Shape = Tuple[int, ...]

DEFAULT_IMAGE_SHAPES: Tuple[Shape, ...] = ((32, 64, 56, 56), (8, 256, 14, 14))
DEFAULT_SEQUENCE_SHAPES: Tuple[Shape, ...] = ((8, 512, 768),)
DEFAULT_SHAPES: Tuple[Shape, ...] = DEFAULT_IMAGE_SHAPES + DEFAULT_SEQUENCE_SHAPES
DEFAULT_DTYPES: Tuple[str, ...] = ("float32", "bfloat16")
DEFAULT_FORMATS: Tuple[str, ...] = ("contiguous", "channels_last")
# The layers that the targets name, timed by default (each baseline-target pair at least once).
DEFAULT_LAYERS: Tuple[str, ...] = ("bn2d", "in2d", "gn", "ln2d", "ln", "rms", "mbn2d", "brn2d", "bin2d", "switch2d",
                                   "cbn2d")

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "f16": "float16", "fp64": "float64", "f64": "float64", "double": "float64", "float": "float32"}
FORMATS: Tuple[str, ...] = ("contiguous", "channels_last")
_FORMAT_ALIASES = {"cl": "channels_last", "nhwc": "channels_last", "contig": "contiguous", "nchw": "contiguous"}

Builder = Callable[[int], nn.Module]
BaselineBuilder = Callable[[nn.Module, int], nn.Module]


@dataclass(frozen=True)
class LayerSpec:
    """One benchmarked layer and what it is compared with.

    ``name``: the label (normzoo registry name). ``kind``: ``"image"`` (``(N, C, *S)``, channels = dim 1) or
    ``"sequence"`` (``(N, L, D)``, channels = last dim). ``rank``: input rank.
    ``make``: channels -> the module under test. ``make_baseline``: (module under test, channels) -> the
    baseline, so it can copy hyper-parameters such as the group count. ``baseline_kind``: ``"torch"`` or
    ``"formula"``; ``baseline_label``: what the baseline is, for the report. ``make_reference``: for the
    BatchNorm family, channels -> the BatchNorm the layer's time is compared with (``None`` otherwise).
    """

    name: str
    kind: str
    rank: int
    make: Builder
    make_baseline: BaselineBuilder
    baseline_kind: str
    baseline_label: str
    make_reference: Optional[Builder] = None
    note: str = ""

    def channels(self, shape: Shape) -> int:
        return shape[-1] if self.kind == "sequence" else shape[1]

    @property
    def family(self) -> Optional[str]:
        """``"bn"`` for the BatchNorm family (time compared with BatchNorm), else ``None``."""
        return "bn" if self.make_reference is not None else None


@dataclass
class Selection:
    """Resolved layer specs plus the names skipped and why."""

    specs: List[LayerSpec] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)


# ----- baselines -------------------------------------------------------------------------------------------

def _eps_of(subject: nn.Module, default: Optional[float] = 1e-5) -> Optional[float]:
    eps = getattr(subject, "eps", default)
    return eps if isinstance(eps, float) or eps is None else default


def _torch_bn(rank: int) -> BaselineBuilder:
    cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    return lambda subject, c: cls(c, eps=_eps_of(subject))


def _torch_in(rank: int) -> BaselineBuilder:
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[rank]
    return lambda subject, c: cls(c, eps=_eps_of(subject), affine=True)


def _groups_of(subject: nn.Module, c: int) -> int:
    for attr in ("num_groups", "groups"):
        g = getattr(subject, attr, None)
        if isinstance(g, int) and g > 0 and c % g == 0:
            return g
    return math.gcd(c, 32)


def _formula(cls: type) -> BaselineBuilder:
    """Build the formula module with the subject's hyper-parameters where the names agree (``eps``, ``groups``,
    ``r_max``, ``d_max``, ``window``, ...): every keyword of ``cls`` that the subject has as a plain number."""
    names = [p for p in inspect.signature(cls).parameters if p != "num_features"]

    def build(subject: nn.Module, c: int) -> nn.Module:
        kwargs = {}
        for name in names:
            value = getattr(subject, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                kwargs[name] = value
        if "groups" in names:
            kwargs["groups"] = _groups_of(subject, c)
        return cls(c, **kwargs)

    return build


_RANK = {"1d": 3, "2d": 4, "3d": 5}
_BN_FAMILY_FORMULAS = (("mbn", formulas.MeanOnlyBatchNormFormula), ("brn", formulas.BatchRenormFormula),
                       ("bin", formulas.BatchInstanceNormFormula), ("switch", formulas.SwitchableNormFormula),
                       ("cbn", formulas.CrossIterationBatchNormFormula))
_Entry = Tuple[str, int, BaselineBuilder, str, Optional[str]]


def _build_table() -> Dict[str, _Entry]:
    """name -> (kind, rank, baseline builder, baseline label, name of the reference BatchNorm or None)."""
    table: Dict[str, _Entry] = {}
    for suffix, rank in _RANK.items():
        table[f"bn{suffix}"] = ("image", rank, _torch_bn(rank), f"torch.nn.BatchNorm{suffix}(C)", None)
        table[f"in{suffix}"] = ("image", rank, _torch_in(rank), f"torch.nn.InstanceNorm{suffix}(C, affine=True)", None)
        for prefix, cls in _BN_FAMILY_FORMULAS:
            table[f"{prefix}{suffix}"] = ("image", rank, _formula(cls), f"formula: {cls.__name__}", f"bn{suffix}")
    table["gn"] = ("image", 4, lambda s, c: nn.GroupNorm(_groups_of(s, c), c, eps=_eps_of(s)),
                   "torch.nn.GroupNorm(G, C)", None)
    table["ln2d"] = ("image", 4, lambda s, c: nn.GroupNorm(1, c, eps=_eps_of(s)),
                     "torch.nn.GroupNorm(1, C) (LayerNorm over C,H,W with per-channel affine)", None)
    for name, rank, cls in (("frn1d", 3, formulas.FilterResponseNormFormula),
                            ("frn", 4, formulas.FilterResponseNormFormula),
                            ("frn3d", 5, formulas.FilterResponseNormFormula),
                            ("evonorm_b0", 4, formulas.EvoNormB0Formula),
                            ("evonorm_s0", 4, formulas.EvoNormS0Formula),
                            ("syncmbn", 4, formulas.MeanOnlyBatchNormFormula)):
        table[name] = ("image", rank, _formula(cls), f"formula: {cls.__name__}", None)
    # Without an initialised process group both SyncBatchNorms are plain BatchNorm over the local batch.
    table["syncbn"] = ("image", 4, lambda s, c: nn.SyncBatchNorm(c, eps=_eps_of(s)),
                       "torch.nn.SyncBatchNorm(C) (single process: local batch)", None)
    table["ln"] = ("sequence", 3, lambda s, c: nn.LayerNorm(c, eps=_eps_of(s)), "torch.nn.LayerNorm(D)", None)
    table["rms"] = ("sequence", 3, lambda s, c: nn.RMSNorm(c, eps=_eps_of(s, None)), "torch.nn.RMSNorm(D)", None)
    return table


_TABLE = _build_table()


def known_layers() -> List[str]:
    """Every layer name the benchmark knows how to compare (registered in normzoo or not)."""
    return sorted(_TABLE)


# Keyword arguments for ``normzoo.create`` where the default layer cannot run on a bare input, and why.
_CREATE_KWARGS: Dict[str, Tuple[Dict[str, object], str]] = {
    f"cbn{suffix}": ({"compensate": False}, "naive windowed statistics (compensate=False): the paper's Taylor "
                                            "compensation needs the preceding conv/linear layer attached")
    for suffix in _RANK
}


def _normzoo_builder(name: str) -> Builder:
    kwargs = _CREATE_KWARGS.get(name, ({}, ""))[0]

    def build(c: int) -> nn.Module:
        from normzoo.registry import create

        return create(name, c, **kwargs)

    return build


def select_layers(names: Optional[Sequence[str]] = None) -> Selection:
    """Resolve layer names (``None``: :data:`DEFAULT_LAYERS`; ``["all"]``: every registered layer with a
    baseline) into specs that build normzoo's modules by name.

    Names that normzoo does not register (yet) are skipped with a note, as are registered names the
    benchmark has no baseline for; an unknown name that is neither raises ``ValueError``.
    """
    out = Selection()
    try:
        from normzoo.registry import available, canonical_name

        registered = set(available())
    except Exception as exc:  # the layer package may be half-written while others work on it
        registered, canonical_name = set(), None  # type: ignore[assignment]
        out.skipped.append({"layer": "*", "reason": f"normzoo layers could not be loaded: {exc!r}"})
    if names is None:
        wanted: List[str] = list(DEFAULT_LAYERS)
    elif list(names) == ["all"]:
        wanted = sorted(registered & set(_TABLE))
        out.skipped += [{"layer": n, "reason": "no baseline known to the benchmark"}
                        for n in sorted(registered - set(_TABLE))]
    else:
        wanted = []
        for n in names:
            key = n.lower()
            if canonical_name is not None and key not in _TABLE:
                try:
                    key = canonical_name(key)
                except KeyError:
                    pass
            if key not in _TABLE and key not in registered:
                raise ValueError(f"normzoo bench: unknown layer {n!r}; known: {', '.join(known_layers())}")
            if key not in wanted:
                wanted.append(key)
    for key in wanted:
        if key not in registered:
            out.skipped.append({"layer": key, "reason": "not registered in normzoo (not written yet)"})
        elif key not in _TABLE:
            out.skipped.append({"layer": key, "reason": "no baseline known to the benchmark"})
        else:
            out.specs.append(spec_for(key))
    return out


def spec_for(name: str, make: Optional[Builder] = None, make_reference: Optional[Builder] = None) -> LayerSpec:
    """The spec of a known layer; ``make``/``make_reference`` override how the modules are built
    (default: ``normzoo.create(name, C)`` and ``normzoo.create("bn<d>", C)``)."""
    if name not in _TABLE:
        raise ValueError(f"normzoo bench: no baseline for layer {name!r}; known: {', '.join(known_layers())}")
    kind, rank, baseline, label, ref = _TABLE[name]
    if ref is not None and make_reference is None:
        make_reference = _normzoo_builder(ref)
    note = _CREATE_KWARGS.get(name, ({}, ""))[1]
    if name == "ln2d":
        note = "torch LayerNorm([C,H,W]) has a per-element affine; compared with GroupNorm(1, C)"
    return LayerSpec(name=name, kind=kind, rank=rank, make=make or _normzoo_builder(name), make_baseline=baseline,
                     baseline_kind="formula" if label.startswith("formula") else "torch", baseline_label=label,
                     make_reference=make_reference if ref is not None else None, note=note)


# ----- shapes, dtypes, formats ----------------------------------------------------------------------------

def parse_shape(text: str) -> Shape:
    """``"32x64x56x56"`` (or ``"32,64,56,56"``) -> ``(32, 64, 56, 56)``; ranks 2 to 5, positive sizes."""
    parts = [p for p in text.lower().replace(",", "x").replace("*", "x").split("x") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"normzoo bench: shape must look like 32x64x56x56, got {text!r}") from None
    if not 2 <= len(shape) <= 5 or any(s <= 0 for s in shape):
        raise ValueError(f"normzoo bench: shape must have 2 to 5 positive sizes, got {text!r}")
    return shape


def parse_dtype(text: str) -> str:
    """Canonical dtype name (``"bf16"`` -> ``"bfloat16"``); one of :data:`DTYPES`."""
    key = _DTYPE_ALIASES.get(text.lower(), text.lower())
    if key not in DTYPES:
        raise ValueError(f"normzoo bench: dtype must be one of {sorted(DTYPES)}, got {text!r}")
    return key


def parse_format(text: str) -> str:
    """Canonical memory-format name (``"cl"`` -> ``"channels_last"``); one of :data:`FORMATS`."""
    key = _FORMAT_ALIASES.get(text.lower(), text.lower())
    if key not in FORMATS:
        raise ValueError(f"normzoo bench: memory format must be one of {FORMATS}, got {text!r}")
    return key


def _derive(shape: Shape, spec: LayerSpec) -> Optional[Shape]:
    """A shape of ``spec``'s rank with the same element count, from a shape of another rank (or None)."""
    if spec.kind == "sequence":
        if len(shape) >= 3:  # an image (N, C, *S) read as tokens: (N, prod(S), C)
            return (shape[0], math.prod(shape[2:]), shape[1])
        return None
    n, c, spatial = shape[0], shape[1], shape[2:]
    if len(shape) < 3:
        return None
    size = math.prod(spatial)
    if spec.rank == 3:
        return (n, c, size)
    if spec.rank == 4:
        if len(spatial) == 1:
            side = math.isqrt(size)
            return (n, c, side, size // side) if side * (size // side) == size else (n, c, 1, size)
        return (n, c, math.prod(spatial[:-1]), spatial[-1])
    # rank 5: split the first spatial dim in two when it is even, else add a depth of 1
    if len(spatial) >= 2 and spatial[0] % 2 == 0:
        return (n, c, 2, spatial[0] // 2, math.prod(spatial[1:]))
    return (n, c, 1) + ((size, 1) if len(spatial) == 1 else (spatial[0], math.prod(spatial[1:])))


def shapes_for(spec: LayerSpec, shapes: Iterable[Shape]) -> List[Shape]:
    """The shapes ``spec`` runs at: those of its rank, else ones derived from the image shapes given.

    Derivation keeps the element count: rank 3 image layers take ``(N, C, H*W)``; rank 5 layers take
    ``(N, C, 2, H/2, W)`` (``(N, C, 1, H, W)`` for odd ``H``); sequence layers read ``(N, C, H, W)`` as
    ``(N, H*W, C)`` tokens.
    """
    shapes = list(dict.fromkeys(tuple(s) for s in shapes))
    exact = [s for s in shapes if len(s) == spec.rank]
    if exact:
        return exact
    sources = [s for s in shapes if len(s) >= 4] or shapes
    derived = [d for d in (_derive(s, spec) for s in sources) if d is not None]
    return list(dict.fromkeys(derived))


def formats_for(spec: LayerSpec, formats: Iterable[str]) -> List[str]:
    """Sequence layers run contiguous only (their channels are already innermost)."""
    formats = list(dict.fromkeys(formats))
    if spec.kind == "sequence":
        return ["contiguous"] if formats else []
    return formats


def make_input(shape: Shape, dtype: torch.dtype, memory_format: str, generator: Optional[torch.Generator] = None,
               requires_grad: bool = True) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` laid out in ``memory_format``.

    ``channels_last`` puts dim 1 innermost for any rank >= 3 (``torch.channels_last`` for rank 4, the
    equivalent strides for ranks 3 and 5).
    """
    if memory_format not in FORMATS:
        raise ValueError(f"normzoo bench: memory format must be one of {FORMATS}, got {memory_format!r}")
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if memory_format == "channels_last" and len(shape) >= 3:
        order = (0,) + tuple(range(2, len(shape))) + (1,)
        inverse = tuple(order.index(i) for i in range(len(shape)))
        x = x.permute(order).contiguous().permute(inverse)
    return x.requires_grad_(requires_grad)


__all__ = ["Shape", "LayerSpec", "Selection", "DEFAULT_SHAPES", "DEFAULT_IMAGE_SHAPES", "DEFAULT_SEQUENCE_SHAPES",
           "DEFAULT_DTYPES", "DEFAULT_FORMATS", "DEFAULT_LAYERS", "DTYPES", "FORMATS", "known_layers",
           "select_layers", "spec_for", "parse_shape", "parse_dtype", "parse_format", "shapes_for", "formats_for",
           "make_input"]
