"""Choosing what trains, and feeding captured rows to a module (shared by layer-wise and end-to-end)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch

import torch
from torch import nn


def select_trainable(module: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of `module`'s floating-point parameters matching any fnmatch pattern (None = all of them).
    Quantized linears keep their weight in integer buffers, so only their float bias can match."""
    return [n for n, p in module.named_parameters() if p.is_floating_point()
            and (patterns is None or any(fnmatch(n, pat) for pat in patterns))]


@contextlib.contextmanager
def trainable_only(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, exactly `names` require grad; every flag is restored afterwards."""
    wanted = set(names)
    before = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        for n, p in module.named_parameters():
            p.requires_grad_(n in wanted)
        yield
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(before[n])


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where `module` computes: its first floating-point parameter (fp32 on CPU if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32
