"""How a weight's inputs are grouped for its scales: the layout every codec and the kernels share.

group_size None: one group per row (per output channel); otherwise groups of `group_size` consecutive
inputs, the last one partial when group_size does not divide in_features.
"""
from __future__ import annotations

import torch


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if not group_size else (in_features + group_size - 1) // group_size


def expand_groups(t: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """[out, G] per-group values -> [out, in] per-weight values (last group may be partial)."""
    if not group_size:
        return t.expand(-1, in_features) if t.shape[1] == 1 else t
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, G, gs] with the partial last group zero-padded (zeros change no min/max/absmax
    once 0 is in range)."""
    out, n = w.shape
    gs = group_size or n
    pad = (-n) % gs
    return torch.nn.functional.pad(w, (0, pad)).view(out, -1, gs)
