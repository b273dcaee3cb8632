"""normzoo's layers as ``torch.nn`` modules, drop-in with their ``torch.nn`` namesakes.

Every module registers a short name for :func:`normzoo.create` (channel count first).
"""
from normzoo.nn._base import NormBase
from normzoo.nn.batch import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
)
from normzoo.nn.group import (
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    default_groups,
)
