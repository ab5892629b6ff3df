"""RTN: uniform round-to-nearest weight quantization, the in-project baseline, plus the `"uniform"` codec
(UNIFORM_CODEC).

Asymmetric min-max per row (group_size None) or per (row, group): the range [min(w, 0), max(w, 0)] is
cut into 2^b - 1 steps, scale = range / (2^b - 1), integer zero point z = round(-min / scale), and
w = (q - z) · scale with q in 0..2^b - 1. Including 0 in the range keeps z in 0..2^b - 1 and makes
exact zeros exact. No clipping search, on purpose: it is the plain baseline the searched methods beat.
Scale and zero are rounded to their fp16 storage first (the scale upwards, so nothing is clipped: every
weight is within half a step), then codes are chosen, so what is stored is what was measured.
Buffers: `scales` fp16 [out, G], `zeros` fp16 [out, G]. The kernel ops take `zeros` as their `aux`; the
decode table is one per row and group, level = code - zero (uniform_levels).
"""
from __future__ import annotations

import torch

from .codecs import KernelArgs, register_codec
from .groups import expand_groups, group_view, num_groups
from .tlq import weight_error


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int | None = None):
    """w [out, in] -> (codes int64 [out, in], buffers {scales, zeros}, info {eta, percentile, mse, sqnr_db})."""
    if not 1 <= bits <= 8:
        raise ValueError(f"RTN needs 1..8 bits, got {bits}")
    if w.dim() != 2 or not torch.isfinite(w).all():
        raise ValueError("rtn_quantize expects a finite 2-D weight [out, in]")
    w = w.detach().float()
    qmax = (1 << bits) - 1
    g = group_view(w, group_size)                       # zero padding is harmless: 0 is always in range
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scales = _fp16_ceil((hi - lo) / qmax)            # rounding up keeps [lo, hi] inside the grid
    s = scales.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zeros = (-lo / safe).round().clamp(0, qmax).to(torch.float16)
    n = w.shape[1]
    q = (w / expand_groups(safe, n, group_size) + expand_groups(zeros.float(), n, group_size)).round()
    codes = q.clamp(0, qmax).long()
    buffers = {"scales": scales, "zeros": zeros}
    return codes, buffers, {"eta": None, "percentile": None,
                            **weight_error(w, rtn_dequantize(codes, buffers, bits, group_size))}


def rtn_column_quantizer(buffers: dict[str, torch.Tensor], bits: int, group_size: int | None):
    """For GPTQ (gptq.py): round one column [out] (index i) onto the fixed scales and zeros -> (codes, values)."""
    qmax = (1 << bits) - 1
    scales, zeros = buffers["scales"].float(), buffers["zeros"].float()

    def quantize_column(col: torch.Tensor, i: int):
        g = i // group_size if group_size else 0
        s, z = scales[:, g], zeros[:, g]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        c = (col / safe + z).round().clamp(0, qmax).long()
        return c, (c.float() - z) * s
    return quantize_column


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (x >= 0)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def rtn_dequantize(codes: torch.Tensor, buffers: dict[str, torch.Tensor], bits: int,
                   group_size: int | None) -> torch.Tensor:
    n = codes.shape[1]
    scale = expand_groups(buffers["scales"].float(), n, group_size)
    zero = expand_groups(buffers["zeros"].float(), n, group_size)
    return (codes.float() - zero) * scale


def uniform_levels(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """zeros [out, G] -> the level of every code per row and group, fp32 [out, G, 2^bits]: code - zero (the
    values rtn_dequantize multiplies by the scale)."""
    q = torch.arange(1 << bits, device=zeros.device, dtype=torch.float32)
    return q - zeros.float()[..., None]


class UniformCodec:
    name = "uniform"
    kernel_args = KernelArgs(scales="scales", aux="zeros")

    def buffer_specs(self, out_features, in_features, bits, group_size):
        g = num_groups(in_features, group_size)
        return {"scales": ((out_features, g), torch.float16), "zeros": ((out_features, g), torch.float16)}

    def dequantize(self, codes, buffers, bits, group_size):
        return rtn_dequantize(codes, buffers, bits, group_size)

    def signed_levels(self, buffers, bits):
        return uniform_levels(buffers["zeros"], bits)


UNIFORM_CODEC = register_codec(UniformCodec())
