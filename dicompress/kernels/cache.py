"""Tensors the Triton wrappers derive from a layer's buffers (decode tables, fp32 smoothing, rotation
factors), built once and reused while those buffers are unchanged.

Rebuilding them on every call costs 19 (decode) or 39 (int8) small torch ops per linear for a TLQ table
(counted with a TorchDispatchMode), each a kernel launch on the GPU, and a rotation factor built on the host
would be a synchronising host-to-device copy on every call. Entries hang off the anchor tensor by identity
(weakly: they go when it goes) and are stamped with each source tensor's identity, storage pointer and version
counter, so an in-place update (a load_state_dict copy, a pass rewriting scales) or a move to another device
rebuilds them. Inference tensors have no version counter: their stamp is the pointer alone (they cannot be
changed in place outside inference mode).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch.utils.weak import WeakIdKeyDictionary

_entries: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(t: torch.Tensor | None) -> tuple:
    if t is None:
        return ()
    try:
        return (id(t), t.data_ptr(), t._version, t.dtype)
    except RuntimeError:                        # an inference tensor: no version counter
        return (id(t), t.data_ptr(), None, t.dtype)


def derived(anchor: torch.Tensor, sources: tuple[torch.Tensor | None, ...], key: Hashable,
            build: Callable[[], object]):
    """build(), or the value it returned for (`anchor`, `key`) while `sources` are unchanged."""
    slot = _entries.get(anchor)
    if slot is None:
        slot = _entries[anchor] = {}
    stamp = tuple(_stamp(t) for t in sources)
    hit = slot.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = _unanchored(build(), anchor)
    slot[key] = (stamp, value)
    return value


def _unanchored(value, anchor: torch.Tensor):
    """`value` with the anchor itself (`t.float()` of an fp32 tensor is the tensor) swapped for an alias of
    its storage: an entry that held its own key would never be freed."""
    if value is anchor:
        return anchor.detach()
    if isinstance(value, tuple):
        return tuple(_unanchored(v, anchor) for v in value)
    return value


def clear() -> None:
    """Drop every entry (tests; freeing the derived tensors' memory early)."""
    _entries.clear()
