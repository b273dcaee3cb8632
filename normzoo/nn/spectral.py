"""Spectral Normalization (Miyato, Kataoka, Koyama & Yoshida 2018).

The weight is divided by its largest singular value, so the layer is 1-Lipschitz in the l2 norm:

    W_SN = W / sigma(W),        sigma(W) = max_{h != 0} ||W h|| / ||h|| = u^T W v

with ``W`` viewed as a matrix ``(out, -1)``: ``dim`` (default 0, the output features; 1 for
ConvTransposeNd, whose weight is ``(in, out/groups, *k)``) is moved to the front and the rest flattened.
The leading singular vectors ``u`` (size ``out``) and ``v`` (size ``in * prod(kernel)``) are estimated by
power iteration, warm-started from the previous step's vectors:

    u <- W v / ||W v||,      then      v <- W^T u / ||W^T u||

``n_power_iterations`` steps per training-mode forward (the paper uses one), none in eval mode. ``u`` and
``v`` live in buffers and are saved in the state_dict. The gradient flows through ``W`` in both the
numerator and ``sigma = u^T W v`` (``u`` and ``v`` are constants for autograd), as in the paper's
section 2.2.

Used in GAN discriminators (critics) to bound their Lipschitz constant. Expose the current estimate with
:func:`spectral_sigma` (or :meth:`SpectralNorm.sigma`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normzoo import _checks


class SpectralNorm(nn.Module):
    r"""The spectral-normalization parametrization ``W -> W / sigma(W)``.

    Buffers ``_u`` (size ``out``) and ``_v`` (size ``W.numel() / out``), named as in
    :func:`torch.nn.utils.parametrizations.spectral_norm` so that checkpoints move between the two; with
    the same ``u``, ``v`` both give the same weight and gradients. Initialization: ``u``, ``v`` drawn from
    ``N(0, 1)``, normalized, then 15 power iterations (as torch), so the estimate is good from the first
    step.

    Each training-mode evaluation runs ``n_power_iterations`` steps, updating ``_u`` then ``_v`` **in
    place** (so replicas that share the buffers' storage see the update), and then normalizes with
    **clones** of them: autograd saves the clones, so two forwards before one backward (``D(real)``,
    ``D(fake)``, then ``loss.backward()``) work. A 1-D weight is simply divided by its norm.
    """

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__()
        layer = "spectral_norm"
        _checks.check_positive_int(layer, "n_power_iterations", n_power_iterations)
        _checks.check_eps(layer, eps)
        ndim = weight.dim()
        if isinstance(dim, bool) or not isinstance(dim, int) or not -max(ndim, 1) <= dim < max(ndim, 1):
            raise ValueError(f"{layer}: dim must be an int in [{-ndim}, {ndim - 1}] for a weight of shape "
                             f"{tuple(weight.shape)}, got {dim!r}")
        self.dim = dim % max(ndim, 1)
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        if ndim > 1:
            mat = self._as_matrix(weight.detach())
            h, w = mat.shape
            self.register_buffer("_u", F.normalize(mat.new_empty(h).normal_(0, 1), dim=0, eps=eps))
            self.register_buffer("_v", F.normalize(mat.new_empty(w).normal_(0, 1), dim=0, eps=eps))
            self._power_iteration(mat, 15)

    def _as_matrix(self, weight: Tensor) -> Tensor:
        """``weight`` as ``(size of dim, -1)``."""
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    @torch.no_grad()
    def _power_iteration(self, mat: Tensor, steps: int) -> None:
        for _ in range(steps):
            self._u.copy_(F.normalize(torch.mv(mat, self._v), dim=0, eps=self.eps))
            self._v.copy_(F.normalize(torch.mv(mat.H, self._u), dim=0, eps=self.eps))

    def forward(self, weight: Tensor) -> Tensor:
        if weight.dim() <= 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        mat = self._as_matrix(weight)
        if self.training:
            self._power_iteration(mat.detach(), self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return weight / torch.vdot(u, torch.mv(mat, v))

    def right_inverse(self, value: Tensor) -> Tensor:
        """Assigning ``module.weight = W`` stores ``W`` itself as the unnormalized weight (as torch)."""
        return value

    @torch.no_grad()
    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate ``u^T W v`` of the largest singular value of ``weight`` (no iteration).

        ``weight`` is the unnormalized weight (``module.parametrizations.weight.original``); for a 1-D
        weight the exact ``||w||``.
        """
        if weight.dim() <= 1:
            return torch.linalg.vector_norm(weight)
        return torch.vdot(self._u, torch.mv(self._as_matrix(weight), self._v))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}"


def _default_dim(module: nn.Module) -> int:
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return 1 if isinstance(module, transposed) else 0


def _legacy_keys_hook(name: str) -> Callable[..., None]:
    """Load-state-dict pre-hook: accept the old ``torch.nn.utils.spectral_norm`` keys.

    The old hook-based version stores ``<name>_orig`` (the unnormalized weight), ``<name>_u`` and
    ``<name>_v``; they are the same tensors as ``parametrizations.<name>.original``, ``.0._u`` and ``.0._v``.
    """

    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        if not is_spectral_normed(module, name) or f"{prefix}{name}_orig" not in state_dict:
            return
        base = f"{prefix}parametrizations.{name}."
        state_dict[base + "original"] = state_dict.pop(f"{prefix}{name}_orig")
        for vec in ("u", "v"):
            old = f"{prefix}{name}_{vec}"
            if old in state_dict:
                state_dict[f"{base}0._{vec}"] = state_dict.pop(old)

    return hook


def _spectral_norm_classes() -> tuple:
    torch_cls = getattr(torch.nn.utils.parametrizations, "_SpectralNorm", None)
    return (SpectralNorm,) if torch_cls is None else (SpectralNorm, torch_cls)


def is_spectral_normed(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is spectrally normalized (by normzoo's or torch's parametrization, alone)."""
    if not parametrize.is_parametrized(module, name):
        return False
    plist = module.parametrizations[name]  # type: ignore[index]
    return len(plist) == 1 and isinstance(plist[0], _spectral_norm_classes())


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: Optional[int] = None,
) -> nn.Module:
    r"""Spectrally normalize ``module.<name>``: ``W / sigma(W)`` with ``sigma`` by power iteration.

    Args:
        module: a module holding the weight (Linear, ConvNd, ConvTransposeNd, Embedding, ...).
        name: the parameter to normalize.
        n_power_iterations: power-iteration steps per training-mode forward (>= 1; the paper uses 1).
        eps: guards the normalization of ``u`` and ``v`` (``x / max(||x||, eps)``).
        dim: the output dim of the weight, which becomes the rows of the matrix; default 0, or 1 for
            ``nn.ConvTranspose{1,2,3}d``.

    Returns:
        ``module`` with the parametrization: the unnormalized weight is
        ``module.parametrizations.<name>.original``, the buffers ``...<name>.0._u`` and ``._v``.

    Same semantics, defaults and state_dict keys as :func:`torch.nn.utils.parametrizations.spectral_norm`;
    state_dicts of the old hook-based :func:`torch.nn.utils.spectral_norm` (``<name>_orig``, ``<name>_u``,
    ``<name>_v``) load too. In eval mode no iteration runs: the weight is ``W / (u^T W v)`` with the stored
    vectors. Convolution note: as in the paper and torch, ``sigma`` is that of the reshaped kernel matrix,
    not the exact operator norm of the convolution.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"spectral_norm: expected an nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"spectral_norm: {type(module).__name__} has no parameter or buffer named {name!r}")
    if not weight.is_floating_point() and not weight.is_complex():
        raise TypeError(f"spectral_norm: {type(module).__name__}.{name} must be floating point, got {weight.dtype}")
    if parametrize.is_parametrized(module, name) and is_spectral_normed(module, name):
        raise ValueError(f"spectral_norm: {type(module).__name__}.{name} is already spectrally normalized")
    if dim is None:
        dim = _default_dim(module)
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps))
    module.register_load_state_dict_pre_hook(_legacy_keys_hook(name))
    return module


def _parametrization(module: nn.Module, name: str, caller: str) -> SpectralNorm:
    if not is_spectral_normed(module, name):
        raise ValueError(f"{caller}: {type(module).__name__}.{name} is not spectrally normalized (alone)")
    return module.parametrizations[name][0]  # type: ignore[index,return-value]


def spectral_sigma(module: nn.Module, name: str = "weight") -> Tensor:
    """The current estimate of ``sigma(W)`` for a spectrally normalized ``module.<name>`` (no gradient).

    ``u^T W v`` from the stored vectors, without running an iteration; ``W`` is the unnormalized weight.
    Works for torch's parametrization too.
    """
    sn = _parametrization(module, name, "spectral_sigma")
    weight = module.parametrizations[name].original  # type: ignore[index]
    if isinstance(sn, SpectralNorm):
        return sn.sigma(weight)
    with torch.no_grad():  # torch's _SpectralNorm: same buffers, same formula
        if weight.dim() <= 1:
            return torch.linalg.vector_norm(weight)
        mat = sn._reshape_weight_to_matrix(weight)
        return torch.vdot(sn._u, torch.mv(mat, sn._v))


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo :func:`spectral_norm`: ``module.<name>`` becomes a plain parameter holding ``W / sigma``.

    The value is the eval-mode one (the current estimate, **no** extra power iteration, unlike torch's
    removal in training mode), i.e. what the module computed in its last eval-mode forward.
    """
    sn = _parametrization(module, name, "remove_spectral_norm")
    was_training = sn.training
    sn.eval()
    try:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    finally:
        sn.train(was_training)
    return module


__all__ = ["SpectralNorm", "spectral_norm", "remove_spectral_norm", "spectral_sigma", "is_spectral_normed"]
