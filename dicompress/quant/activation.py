"""Dynamic per-token activation quantization (LRQ-DiT's A8 / A6 / A4), as pure functions.

Each token (row of the last dim) gets its own symmetric absmax scale, computed on the fly:
  q_max = 2^(b-1) - 1,  step = max|x_token| / q_max,  x_hat = clamp(round(x / step), -q_max, q_max) · step.
Symmetric by default: the grid is then what an int8 / int4 GEMM consumes with one scale per row, and zero
stays exactly zero. Nothing is clipped (the step comes from the token's own max), so every value is within
half a step of its reconstruction.

With a zero point (asymmetric), each token's grid spans [min(x, 0), max(x, 0)] instead of [-max|x|, max|x|]:
  step = (hi - lo) / (2^b - 1),  zero = round(-lo / step) in 0..2^b - 1,
  x_hat = (clamp(round(x / step) + zero, 0, 2^b - 1) - zero) · step.
The zero point is an integer, so zero still maps to exactly zero. A token whose values are one-sided (after a
GELU) leaves half of a symmetric grid unused, one of its b bits. The GEMM still takes integer codes: centred codes
c = q - 2^(b-1) fit int8, and x_hat · Wᵀ = step · (c · Wᵀ) - offset · (1 · Wᵀ) with offset = (zero - 2^(b-1))
· step per token, a rank-1 correction by the weight's row sums (kernels/linear.py).

The math runs in fp32 whatever the input dtype (bf16 has 8 mantissa bits: x / step in bf16 would already round
before the grid does).
"""
from __future__ import annotations

import torch

ACT_BITS_RANGE = (2, 16)


def check_act_bits(bits) -> int:
    """`bits` as an int in 2..16, else ValueError saying what to change."""
    lo, hi = ACT_BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"activation bits must be an integer in {lo}..{hi}, got {bits!r} "
                         f"(set act_quant.bits to e.g. 8, 6 or 4)")
    return bits


def per_token_step(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantization step of every token: max|x| over the last dim / (2^(b-1) - 1), shape [..., 1], fp32."""
    qmax = (1 << (check_act_bits(bits) - 1)) - 1
    return x.detach().float().abs().amax(-1, keepdim=True) / qmax


def asymmetric_step_zero(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's step and integer zero point (both fp32, [..., 1]) for the grid over [min(x, 0), max(x, 0)];
    an all-zero token gets step 0 and zero 0."""
    levels = (1 << check_act_bits(bits)) - 1
    xf = x.detach().float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / levels
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return step, (-lo / safe).round().clamp(0, levels)


def quantize_per_token(x: torch.Tensor, bits: int, zero_point: bool = False) -> torch.Tensor:
    """Fake-quantize `x` to `bits` per token (symmetric absmax, or asymmetric with an integer zero point);
    returns x_hat in x's dtype and shape.

    With autograd recording, the gradient is straight-through (d x_hat / d x = identity): round() alone has a
    zero derivative almost everywhere, which would give everything upstream of a quantized linear no gradient.
    Nothing is clipped (the step is the token's own absmax), so the identity is the whole STE; the step is a
    constant to autograd (per_token_step detaches)."""
    xf = x.float()
    if zero_point:
        step, zero = asymmetric_step_zero(xf, bits)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = ((xf.detach() / safe).round() + zero).clamp(0, (1 << bits) - 1)
        return straight_through(x, ((q - zero) * safe).to(x.dtype))
    qmax = (1 << (check_act_bits(bits) - 1)) - 1
    step = per_token_step(xf, bits)
    safe = torch.where(step > 0, step, torch.ones_like(step))   # an all-zero token stays zero
    x_hat = ((xf.detach() / safe).round().clamp(-qmax, qmax) * safe).to(x.dtype)
    return straight_through(x, x_hat)


def straight_through(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """x_hat's values with x's gradient: x_hat + (x - x.detach()). The added term is exactly zero, so the
    value is x_hat bit for bit (x + (x_hat - x).detach() would round twice); with no gradient recorded,
    x_hat itself."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x_hat
    return x_hat + (x - x.detach())
