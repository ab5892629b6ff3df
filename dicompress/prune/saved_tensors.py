"""Activation memory of a backward, measured: the bytes autograd keeps saved for backward, alive at once.

Counted from `torch.autograd.graph.saved_tensors_hooks` (each saved tensor's storage counted once while any saved
reference to it lives; a reference dies when autograd frees the graph), not from the allocator: deterministic, and
the same on CPU as the activations a GPU would hold. Parameters and buffers are left out (they are not
activations, and autograd saves them by reference).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence

import torch


class _Held:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedTensorMeter:
    """Bytes of the distinct storages autograd holds saved for backward, alive at once: the activation memory of
    a backward, peak over the metered span. Storages in `exclude` (the model's parameters and buffers) are not
    activations and are left out. Deterministic (counts tensors, not allocator pages), so it works on CPU."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= self.sizes.pop(ptr)

    def _pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude or st.nbytes() == 0:
            return t
        h = _Held(t)
        if ptr not in self.refs:
            self.refs[ptr], self.sizes[ptr] = 0, st.nbytes()
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        weakref.finalize(h, self._release, ptr)
        return h

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    @contextlib.contextmanager
    def metering(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self
