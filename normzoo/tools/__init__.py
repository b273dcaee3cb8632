"""Tools for the chores around normalization layers, each avoiding a known trap.

- :func:`convert` -- replace every normalization layer by another method (``convert(model, "gn", groups=32)``),
  by name, carrying parameters and running statistics; :func:`to_torch` / :func:`to_normzoo` swap libraries.
- :func:`fold` -- fold eval-mode BatchNorm into the preceding conv/linear layer for inference.
- :func:`recalibrate` -- recompute population statistics over data (precise BN), pooled or averaged,
  without turning dropout on.
- :func:`freeze` / :func:`unfreeze` / :func:`is_frozen` -- freeze BatchNorm so that ``model.train()`` cannot
  unfreeze it.
- :class:`SyncBatchNorm`, :func:`convert_sync` / :func:`revert_sync` -- BatchNorm statistics over all
  processes (gloo and NCCL, unequal and empty batches).
"""
from normzoo.nn.sync import SyncBatchNorm
from normzoo.tools._layers import is_norm, keeps_batch_stats
from normzoo.tools.convert import carry_state, convert, to_normzoo, to_torch
from normzoo.tools.fold import find_fold_pairs, fold, fold_into, running_affine
from normzoo.tools.freeze import freeze, frozen_layers, is_frozen, unfreeze
from normzoo.tools.recalibrate import recalibrate
from normzoo.tools.sync import convert_sync, register_sync, revert_sync, sync_batch_norm

__all__ = [
    "convert",
    "to_torch",
    "to_normzoo",
    "carry_state",
    "fold",
    "fold_into",
    "find_fold_pairs",
    "running_affine",
    "recalibrate",
    "freeze",
    "unfreeze",
    "is_frozen",
    "frozen_layers",
    "SyncBatchNorm",
    "convert_sync",
    "revert_sync",
    "register_sync",
    "sync_batch_norm",
    "is_norm",
    "keeps_batch_stats",
]
