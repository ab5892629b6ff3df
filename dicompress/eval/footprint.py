"""Memory and disk footprint of a (possibly compressed) model.

A compressed module is recognised by a `weight_bytes` attribute (QuantLinear today, other packed
modules later), not by its class, so new module types are counted without changes here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

BF16_BYTES = 2


def is_packed(module: nn.Module) -> bool:
    """A compressed module: one that reports its packed `weight_bytes`."""
    return hasattr(module, "weight_bytes")


def _dense_weight_numel(module: nn.Module) -> int:
    """Elements of the dense weight a packed module stands for (out x in for a linear)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features) * int(module.out_features)
    return module.dequantize().numel()  # generic fallback for packed modules of other shapes


def _unique_tensors(module: nn.Module):
    """Every parameter and buffer once, even when tied or shared between modules."""
    seen = set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers in their stored dtypes (the in-memory weight footprint)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(module))


def _bf16_size(t: torch.Tensor) -> int:
    # Integer / bool tensors (indices, codes of non-packed modules) keep their own width.
    return t.numel() * (BF16_BYTES if t.is_floating_point() else t.element_size())


def bf16_bytes(module: nn.Module) -> int:
    """Bytes the model would take as a bf16 teacher: every floating tensor in bf16, and every packed
    module as the dense bf16 weight it replaces plus its bias in bf16 (its codec tensors dropped)."""
    total, seen = 0, set()

    def visit(m: nn.Module):
        nonlocal total
        if is_packed(m):
            total += _dense_weight_numel(m) * BF16_BYTES
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor) and id(bias) not in seen:
                seen.add(id(bias))
                total += bias.numel() * BF16_BYTES
            return  # the packed module's own buffers stand for the dense weight counted above
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += _bf16_size(t)
        for child in m.children():
            visit(child)

    visit(module)
    return total


def quantized_linear_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(packed bytes, bf16-equivalent bytes, count) over modules with `weight_bytes`.

    Biases are left out of both sides, so the ratio compares weight storage only.
    """
    packed = dense = count = 0
    for m in model.modules():
        if is_packed(m):
            packed += int(m.weight_bytes)
            dense += _dense_weight_numel(m) * BF16_BYTES
            count += 1
    return packed, dense, count


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
