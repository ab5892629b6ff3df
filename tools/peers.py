"""Published peers run here for comparison: bitsandbytes NF4 (weight-only, as diffusers' `load_in_4bit`).

`bitsandbytes.nn.Linear4bit` runs on this CPU with compute_dtype=float32 and gives bitsandbytes' own NF4
numerics (its forward equals x @ dequantize_4bit(W).T + b exactly), so the real module is used, not a
re-implementation: the peer is measured as users would get it.
"""
from __future__ import annotations

from typing import Iterable

import bitsandbytes as bnb
import torch
from torch import nn

from dicompress.nn.surgery import iter_linears, set_module


def nf4_linear(linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> bnb.nn.Linear4bit:
    """`linear` as an NF4 Linear4bit (fp32 compute) on the same device; quantized on `.to(device)`."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().float().cpu(), requires_grad=False, quant_type="nf4",
                                 blocksize=blocksize, compress_statistics=double_quant)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().cpu(), requires_grad=False)
    return q.to(linear.weight.device)


def nf4_bytes(q: bnb.nn.Linear4bit) -> int:
    """Packed bytes of the weight: 4-bit codes + block absmax (+ the second-level absmax when nested)."""
    qs = q.weight.quant_state
    parts = [q.weight.data, qs.absmax]
    if qs.nested:
        parts += [qs.state2.absmax, qs.offset]
    return sum(t.numel() * t.element_size() for t in parts)


def apply_bnb_nf4(model: nn.Module, include: Iterable[str], keep: Iterable[str] = (), blocksize: int = 64,
                  double_quant: bool = False) -> dict:
    """Replace the matching nn.Linear modules of `model` by NF4 Linear4bit in place."""
    targets = list(iter_linears(model, include, keep))
    if not targets:
        raise ValueError(f"no nn.Linear matches include {list(include)} minus keep {list(keep)}")
    total = bf16 = 0
    for name, linear in targets:
        bf16 += linear.weight.numel() * 2
        q = nf4_linear(linear, blocksize, double_quant)
        set_module(model, name, q)
        total += nf4_bytes(q)
    return {"bytes": total, "bf16_bytes": bf16, "layers": len(targets)}
