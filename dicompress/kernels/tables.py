"""The small per-row tables the quantized GEMM decodes codes through, as pure functions.

A weight is w[r, c] = level[r, g', code[r, c]] · scale[r, group(c)], with g' = 0 (one table of 2^bits entries
per row, e.g. TLQ's signed log levels) or g' = the scale group (e.g. uniform codes minus a per-group zero point).
`signed_levels` asks the weight codec for that table in fp32 (quant/codecs.py: Codec.signed_levels, exactly
the values its dequantize uses), and `int8_grid` maps it onto an int8 grid per row, level ≈ t[r] · q (path (b)
of the GEMM: int8 tensor cores).
`weight_tables` gives a GEMM mode's table with its row and group scales, `unpacked_weight` the int8 matrix
of the mapped levels (mode int8_unpacked, and the CPU's int8 GEMM).
"""
from __future__ import annotations

import torch

from ..quant.codecs import get_codec
from ..quant.groups import expand_groups
from ..quant.packing import unpack_codes
from .dispatch import INT8_MODES

INT8_MAX = 127


def signed_levels(codec: str, scales: torch.Tensor, aux: torch.Tensor, eta: torch.Tensor | None,
                  bits: int) -> torch.Tensor:
    """Level of every code: fp32 [out, G', 2^bits] (G' = 1 or the number of scale groups, as the codec
    declares), from the kernel ops' arguments (`aux`, `eta`: the codec's kernel_args buffers)."""
    c = get_codec(codec)
    return c.signed_levels(c.kernel_args.buffers(scales, aux, eta), bits)


def int8_grid(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """levels fp32 [out, G', L] -> (q int8 [out, G', L], t fp32 [out]) with level ≈ t · q per row.

    Exact where the grid allows: a row whose levels are all integers in [-127, 127] (uniform codes minus
    their zero point, up to 7 bits) keeps t = 1. Otherwise t = max|level| / 127 and q is the nearest
    integer, an error of at most t/2 per level (TLQ's log-spaced levels are never on one integer grid)."""
    flat = levels.flatten(1)
    amax = flat.abs().amax(1)
    exact = (flat == flat.round()).all(1) & (amax <= INT8_MAX)
    t = torch.where(exact, torch.ones_like(amax), amax / INT8_MAX)
    t = torch.where(t > 0, t, torch.ones_like(t))                           # an all-zero row stays zero
    q = (levels / t[:, None, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, t


def gather_levels(table: torch.Tensor, codes: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """table [out, G', L] and codes int64 [out, in] -> the level of every weight, [out, in] (table dtype)."""
    out, n = codes.shape
    if table.shape[1] == 1:
        return table[:, 0].gather(1, codes)
    g = expand_groups(torch.arange(table.shape[1], device=codes.device)[None], n, group_size).expand(out, n)
    return table.flatten(1).gather(1, g * table.shape[2] + codes)


def int8_mapped_weight(codes: torch.Tensor, codec: str, scales: torch.Tensor, aux: torch.Tensor,
                       eta: torch.Tensor | None, bits: int, group_size: int | None) -> torch.Tensor:
    """The fp32 weight [out, in] path (b) computes with: t[r] · q[code] · scale[r, group]."""
    q, t = int8_grid(signed_levels(codec, scales, aux, eta, bits))
    w8 = gather_levels(q, codes, group_size).float()
    return w8 * t[:, None] * expand_groups(scales.float(), codes.shape[1], group_size)


def weight_tables(codec: str, scales: torch.Tensor, aux: torch.Tensor, eta: torch.Tensor | None, bits: int,
                  group_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(table [out, G', 2^bits] fp32 or int8, row scale [out] fp32, group scales [out, G] fp32 or None)."""
    lut = signed_levels(codec, scales, aux, eta, bits)
    row = torch.ones(lut.shape[0], dtype=torch.float32, device=lut.device)
    if mode in INT8_MODES:
        lut, row = int8_grid(lut)
    if group_size:
        return lut.contiguous(), row, scales.float().contiguous()
    return lut.contiguous(), row * scales.float()[:, 0], None


def unpacked_weight(qweight, scales, aux, eta, codec, bits, group_size, k):
    """(int8 weight [N, K] of the int8-mapped levels, row scale [N] fp32, group scales [N, G] fp32 or None):
    the operands of an int8 GEMM on the unpacked weight (cached by the callers: int8_mm.unpacked_operands)."""
    lut, rscale, gscale = weight_tables(codec, scales, aux, eta, bits, group_size, "int8")
    codes = unpack_codes(qweight, bits, k)
    return gather_levels(lut, codes, group_size or None).contiguous(), rscale, gscale
