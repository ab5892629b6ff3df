"""What QuantLinear.forward and ActTransform.forward run: the modules' buffers handed to the kernel ops.

    A8 (act_bits <= 8)  quantize_act -> int8 codes + per-token steps -> qlinear on the codes (fused path)
    A16 / wider acts    the float transform (smooth, rotation, fake quantization) -> qlinear on floats
With autograd recording and an input (or the bias) that requires grad, the differentiable torch
composition runs instead (the same reference math, so the values are the same).
"""
from __future__ import annotations

import torch

from ..quant.activation import quantize_per_token
from . import ops, reference
from .dispatch import current_mode

MAX_CODE_BITS = 8                      # integer activation codes are held in int8


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _act_args(act) -> tuple:
    """(smooth, signs, rotation) of an ActTransform; absent ones are None."""
    kind = act.rotation_kind
    return (act.smooth if act.has_smooth else None, act.signs if kind == "hadamard" else None,
            act.rotation if kind == "dense" else None)


def _fused(act) -> bool:
    return act is not None and act.act_bits is not None and act.act_bits <= MAX_CODE_BITS


def act_forward(act, x: torch.Tensor) -> torch.Tensor:
    """ActTransform.forward: x / smooth -> rotation -> per-token fake quantization, in x's dtype."""
    if _fused(act) and not _needs_grad(x):
        codes, steps = ops.quantize_act(x, *_act_args(act), act.act_bits)
        return reference.dequantize_act(codes, steps, x.dtype)
    x = reference.transform_act(x, *_act_args(act))
    return x if act.act_bits is None else quantize_per_token(x, act.act_bits)


def _weight_args(q) -> tuple:
    return (q.qweight, q.scales, getattr(q, reference.AUX_NAME[q.codec]), getattr(q, "eta", None), q.bias, q.codec,
            q.bits, q.group_size or 0, current_mode())


def quant_linear_forward(q, x: torch.Tensor) -> torch.Tensor:
    """QuantLinear.forward: y = act(x) · decode(qweight)ᵀ + bias, in x's dtype."""
    if q.codec not in reference.AUX_NAME or _needs_grad(x, q.bias):
        # the differentiable torch composition; also the path of codecs the kernels have no table for
        if q.act is not None:
            x = act_forward(q.act, x)
        if q.codec not in reference.AUX_NAME:
            return reference.linear(x, q.dequantize(), q.bias)
        return reference.qlinear(x, None, *_weight_args(q), x.dtype)
    if _fused(q.act):
        codes, steps = ops.quantize_act(x, *_act_args(q.act), q.act.act_bits)
        return ops.qlinear(codes, steps, *_weight_args(q), x.dtype)
    if q.act is not None:
        x = act_forward(q.act, x)
    return ops.qlinear(x, None, *_weight_args(q), x.dtype)
