"""Input validation shared by the functional forms and the modules: clear errors, never a silent NaN."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from torch import Tensor


def check_eps(layer: str, eps: float) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{layer}: eps must be a positive number, got {eps!r}")


def check_momentum(layer: str, momentum: Optional[float]) -> None:
    if momentum is None:
        return
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{layer}: momentum must be a number in [0, 1] or None (cumulative average), got {momentum!r}")


def check_positive_int(layer: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")
    return value


def check_input(
    layer: str,
    x: object,
    dims: Iterable[int],
    num_channels: Optional[int] = None,
    shape_hint: str = "",
) -> Tensor:
    """A floating-point tensor of one of the allowed ranks, with ``num_channels`` in dim 1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    dims = tuple(dims)
    if x.dim() not in dims:
        want = " or ".join(f"{d}D" for d in dims)
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{layer}: expected {want} input{hint}, got {x.dim()}D input of shape {tuple(x.shape)}")
    check_floating(layer, x)
    if num_channels is not None and x.shape[1] != num_channels:
        raise ValueError(
            f"{layer}: expected {num_channels} channels in dim 1, got input of shape {tuple(x.shape)} "
            f"with {x.shape[1]} channels"
        )
    return x


def check_floating(layer: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{layer}: expected a floating-point input (float32, float64, bfloat16, float16), got dtype {x.dtype}")


def check_batch_stats(layer: str, x: Tensor, count: int, what: str = "value per channel") -> None:
    """Training with batch statistics needs more than one value per statistics group."""
    if count <= 1:
        raise ValueError(
            f"{layer}: expected more than 1 {what} when training, got input of shape {tuple(x.shape)} "
            f"({count} {what})"
        )


def check_param(layer: str, name: str, p: Optional[Tensor], shape: Sequence[int]) -> None:
    if p is not None and p.shape != tuple(shape):
        raise ValueError(f"{layer}: expected {name} of shape {tuple(shape)}, got {tuple(p.shape)}")


def check_channel_params(layer: str, num_channels: int, **params: Optional[Tensor]) -> None:
    """Every given per-channel tensor (weight, bias, running statistics, gates) has shape ``(C,)``."""
    for name, p in params.items():
        check_param(layer, name, p, (num_channels,))


def check_groups(layer: str, num_groups: int, num_channels: int) -> None:
    check_positive_int(layer, "num_groups", num_groups)
    if num_channels % num_groups != 0:
        raise ValueError(
            f"{layer}: num_groups ({num_groups}) must divide num_channels ({num_channels}); "
            f"divisors of {num_channels} are {[g for g in range(1, num_channels + 1) if num_channels % g == 0]}"
        )


__all__ = [
    "check_eps",
    "check_momentum",
    "check_positive_int",
    "check_input",
    "check_floating",
    "check_batch_stats",
    "check_param",
    "check_channel_params",
    "check_groups",
]
