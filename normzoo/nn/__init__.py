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
from normzoo.nn.evonorm import EvoNormB0, EvoNormS0
from normzoo.nn.response import FRN, TLU, FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d
from normzoo.nn.spectral import SpectralNorm, remove_spectral_norm, spectral_norm, spectral_sigma
from normzoo.nn.weight import WeightNorm, data_dependent_init, remove_weight_norm, weight_norm
from normzoo.nn.sync import SyncBatchNorm
from normzoo.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule
from normzoo.nn.batch_instance import BatchInstanceNorm1d, BatchInstanceNorm2d, bin_param_groups
from normzoo.nn.switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d
from normzoo.nn.cross_iteration import CrossIterationBatchNorm1d, CrossIterationBatchNorm2d

__all__ = [
    "NormBase",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "default_groups",
    "EvoNormB0",
    "EvoNormS0",
    "FRN",
    "TLU",
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "SpectralNorm",
    "remove_spectral_norm",
    "spectral_norm",
    "spectral_sigma",
    "WeightNorm",
    "data_dependent_init",
    "remove_weight_norm",
    "weight_norm",
    "SyncBatchNorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "RenormSchedule",
    "BatchInstanceNorm1d",
    "BatchInstanceNorm2d",
    "bin_param_groups",
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
]
