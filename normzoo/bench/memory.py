"""Bytes a layer keeps alive for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``.

Counting rule (the benchmark reports exactly this):

* Every tensor that autograd saves during the forward call passes through the pack hook, for native ops
  (``torch.nn.functional.batch_norm``'s C++ node) and Python ``autograd.Function``s alike.
* Tensors are grouped by the **storage** they live in (``untyped_storage().data_ptr()``), and each distinct
  storage is counted **once**, with its full size ``untyped_storage().nbytes()``: two views of one buffer
  cost one buffer, and a small view of a big buffer keeps the whole buffer alive, so it costs the buffer.
* Storages that belong to the module's **parameters or buffers** (``weight``, ``bias``, ``running_mean``,
  ...) are reported separately as ``parameter_bytes``; they exist whether or not a graph does. Everything
  else is ``activation_bytes``, the input included when the layer saves it (the input is usually kept
  alive by the caller anyway, but it is what a layer *needs* for backward, so it counts);
  ``saves_input`` says whether it did.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class SavedBytes:
    """What one forward call saved for backward (see the module docstring for the counting rule).

    ``activation_bytes``: distinct storages that are not parameters/buffers, in bytes.
    ``parameter_bytes``: distinct storages of the module's parameters and buffers, in bytes.
    ``tensors``: how many times the pack hook fired (saved references, duplicates included).
    ``storages``: distinct storages counted (both kinds).
    ``saves_input``: whether the input's storage is among them.
    """

    activation_bytes: int
    parameter_bytes: int
    tensors: int
    storages: int
    saves_input: bool

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _storage_key(t: Tensor) -> Optional[int]:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None
    return storage.data_ptr() if storage.nbytes() else None


def saved_for_backward(fn: Callable[[], Any], module: Optional[torch.nn.Module] = None,
                       inputs: Iterable[Tensor] = (), extra_parameters: Iterable[Tensor] = ()) -> SavedBytes:
    """Run ``fn()`` once under a counting pack hook and return what its graph saved.

    ``module``: its parameters and buffers (and ``extra_parameters``) are counted as ``parameter_bytes``.
    ``inputs``: tensors whose storage, if saved, sets ``saves_input``. ``fn``'s result is kept alive until
    the count is done, then released with its graph.
    """
    return count_saved(fn, module, inputs, extra_parameters)[0]


def count_saved(fn: Callable[[], Any], module: Optional[torch.nn.Module] = None, inputs: Iterable[Tensor] = (),
                extra_parameters: Iterable[Tensor] = ()) -> Tuple[SavedBytes, Any]:
    """:func:`saved_for_backward`, also returning ``fn()``'s result (and with it the graph, still alive)."""
    param_keys = set()
    tensors = list(extra_parameters)
    if module is not None:
        tensors += list(module.parameters()) + list(module.buffers())
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            param_keys.add(key)
    input_keys = {k for k in (_storage_key(t) for t in inputs) if k is not None}

    sizes: Dict[int, int] = {}
    held = []  # keeps every saved storage alive until counted, so no address is reused mid-count
    count = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal count
        count += 1
        held.append(t)
        key = _storage_key(t)
        if key is not None:
            sizes[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    activation = sum(size for key, size in sizes.items() if key not in param_keys)
    parameter = sum(size for key, size in sizes.items() if key in param_keys)
    del held
    saved = SavedBytes(activation_bytes=activation, parameter_bytes=parameter, tensors=count,
                       storages=len(sizes), saves_input=bool(input_keys & set(sizes)))
    return saved, result


__all__ = ["SavedBytes", "saved_for_backward", "count_saved"]
