"""Pure-torch reference implementations of the kernel ops: the CPU path and the test oracle.

They compute exactly what QuantLinear / ActTransform computed before the ops existed (same torch calls in
the same order and dtypes), so on CPU a model's outputs do not change by a single bit:
    x / smooth -> rotation (in x's dtype) -> per-token codes and steps (fp32) -> x_hat = codes · step
    w = decode(codes) in fp32 -> cast to x's dtype -> F.linear(x_hat, w, bias)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.activation import asymmetric_step_zero, check_act_bits, per_token_step
from ..quant.codecs import get_codec
from ..quant.hadamard import apply_hadamard
from ..quant.packing import unpack_codes
from .dispatch import INT8_MODES
from .tables import int8_mapped_weight


def transform_act(x: torch.Tensor, smooth: torch.Tensor | None, signs: torch.Tensor | None,
                  rotation: torch.Tensor | None) -> torch.Tensor:
    """x / smooth, then x · Q (randomised Hadamard diag(signs)·H, or the dense rotation), in x's dtype."""
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    if signs is not None:
        return apply_hadamard(x * signs.to(x.dtype))
    if rotation is not None:
        return x @ rotation.to(x.dtype)
    return x


def quantize_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric absmax codes (int8, |code| <= 2^(b-1) - 1) and steps (fp32, 0 for an all-zero
    token) of x [..., K]: codes [..., K], steps [...]. codes · step is quantize_per_token(x, bits)."""
    if check_act_bits(bits) > 8:
        raise ValueError(f"integer activation codes hold at most 8 bits, got {bits}")
    qmax = (1 << (bits - 1)) - 1
    xf = x.float()
    step = per_token_step(xf, bits)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return (xf / safe).round().clamp(-qmax, qmax).to(torch.int8), step[..., 0]


def quantize_codes_zp(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric codes of x [..., K]: centred codes c = q - 2^(b-1) (int8 [..., K]), steps and offsets
    (fp32 [...]) with codes · step - offset = quantize_per_token(x, bits, zero_point=True)."""
    if check_act_bits(bits) > 8:
        raise ValueError(f"integer activation codes hold at most 8 bits, got {bits}")
    half = 1 << (bits - 1)
    xf = x.float()
    step, zero = asymmetric_step_zero(xf, bits)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = ((xf / safe).round() + zero).clamp(0, 2 * half - 1)
    return (q - half).to(torch.int8), step[..., 0], ((zero - half) * step)[..., 0]


def quantize_act(x, smooth, signs, rotation, bits):
    return quantize_codes(transform_act(x, smooth, signs, rotation), bits)


def quantize_act_zp(x, smooth, signs, rotation, bits):
    return quantize_codes_zp(transform_act(x, smooth, signs, rotation), bits)


def dequantize_act(codes: torch.Tensor, steps: torch.Tensor, dtype: torch.dtype,
                   offsets: torch.Tensor | None = None) -> torch.Tensor:
    x = codes.float() * steps[..., None]
    return (x if offsets is None else x - offsets[..., None]).to(dtype)


def decode_weight(qweight: torch.Tensor, in_features: int, codec: str, scales: torch.Tensor, aux: torch.Tensor,
                  eta: torch.Tensor | None, bits: int, group_size: int | None, mode: str) -> torch.Tensor:
    """The fp32 weight [out, in] a GEMM mode computes with: the codec's exact decode, or its int8 mapping (both
    int8 modes: they differ only in where the GPU keeps the mapped weight)."""
    c = get_codec(codec)                            # first: an unknown codec fails before any work
    codes = unpack_codes(qweight, bits, in_features)
    if mode in INT8_MODES:
        return int8_mapped_weight(codes, codec, scales, aux, eta, bits, group_size)
    return c.dequantize(codes, c.kernel_args.buffers(scales, aux, eta), bits, group_size)


def qlinear(x, x_scale, qweight, scales, aux, eta, bias, codec, bits, group_size, mode, out_dtype):
    """y = x_hat · wᵀ + b in out_dtype; x_hat = x (float) or codes · x_scale (x int8 codes, x_scale [...])."""
    if x_scale is not None:
        x = dequantize_act(x, x_scale, out_dtype)
    return linear(x, decode_weight(qweight, x.shape[-1], codec, scales, aux, eta, bits, group_size or None, mode),
                  bias)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in x's dtype with the fp32 weight and the bias cast to it."""
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
