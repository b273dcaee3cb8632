"""NumPy reference implementations: forward and hand-derived backward for every normalization layer.

Readable, exact, slow -- the ground truth the torch layers are tested against, and the code a
student reads next to the papers. Signatures follow the CS231n assignment: ``*_forward(x, gamma,
beta, ..., param) -> (out, cache)`` and ``*_backward(dout, cache) -> (dx, dgamma, dbeta, ...)``.
This package imports NumPy only (never torch).

Conventions, where libraries disagree:

- **Momentum** (BN-family ``param["momentum"]``, default 0.9) is CS231n's:
  ``running = momentum * running + (1 - momentum) * batch`` -- 0.9 keeps 90% of the old value.
  torch writes ``running = (1 - momentum) * running + momentum * batch`` with default 0.1, so
  reference momentum ``m`` is torch momentum ``1 - m``.
- **Running variance** accumulates the biased batch variance (CS231n); ``param["unbiased"] = True``
  accumulates the ``n/(n-1)``-corrected one, as torch does. Running statistics start at zeros
  (mean) and ones (variance) and are written back into ``param`` after every training step.
- **Normalization** always divides by ``sqrt(biased variance + eps)``, as the papers and torch do.
- **Per-channel parameters** of channel-first inputs may be (C,) or (1, C, 1, ..., 1); gradients come
  back in the shape given.

Layers: :func:`batchnorm_forward` / :func:`batchnorm_backward` / :func:`batchnorm_backward_alt`,
:func:`spatial_batchnorm_forward`, :func:`layernorm_forward`, :func:`instancenorm_forward`,
:func:`spatial_groupnorm_forward`, :func:`rmsnorm_forward`, :func:`batchrenorm_forward`,
:func:`batchinstancenorm_forward`, :func:`switchnorm_forward` (each with its ``*_backward``).
Gradient checking: :func:`eval_numerical_gradient`, :func:`eval_numerical_gradient_array`,
:func:`rel_error`, :func:`check_layer`.
"""
from .batch_instance import BatchInstanceNormCache, batchinstancenorm_backward, batchinstancenorm_forward
from .batchnorm import (BatchNormCache, SpatialBatchNormCache, batchnorm_backward, batchnorm_backward_alt,
                        batchnorm_forward, spatial_batchnorm_backward, spatial_batchnorm_forward)
from .gradcheck import check_layer, eval_numerical_gradient, eval_numerical_gradient_array, rel_error
from .groupnorm import GroupNormCache, spatial_groupnorm_backward, spatial_groupnorm_forward
from .instancenorm import InstanceNormCache, instancenorm_backward, instancenorm_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .renorm import BatchRenormCache, batchrenorm_backward, batchrenorm_forward
from .rmsnorm import RMSNormCache, rmsnorm_backward, rmsnorm_forward
from .switchable import SWITCH_ORDER, SwitchNormCache, switchnorm_backward, switchnorm_forward

__all__ = [
    # batch norm
    "batchnorm_forward", "batchnorm_backward", "batchnorm_backward_alt",
    "spatial_batchnorm_forward", "spatial_batchnorm_backward",
    # per-sample norms
    "layernorm_forward", "layernorm_backward",
    "instancenorm_forward", "instancenorm_backward",
    "spatial_groupnorm_forward", "spatial_groupnorm_backward",
    "rmsnorm_forward", "rmsnorm_backward",
    # later methods
    "batchrenorm_forward", "batchrenorm_backward",
    "batchinstancenorm_forward", "batchinstancenorm_backward",
    "switchnorm_forward", "switchnorm_backward", "SWITCH_ORDER",
    # gradient checking
    "eval_numerical_gradient", "eval_numerical_gradient_array", "rel_error", "check_layer",
    # caches
    "BatchNormCache", "SpatialBatchNormCache", "LayerNormCache", "InstanceNormCache", "GroupNormCache",
    "RMSNormCache", "BatchRenormCache", "BatchInstanceNormCache", "SwitchNormCache",
]
