"""SmoothQuant's per-channel factors and the exact ways of absorbing them, as pure functions.

For a linear y = x·Wᵀ and a per-input-channel s > 0:  y = (x / s)·(W·diag(s))ᵀ exactly. SmoothQuant picks
  s_j = max|X_j|^α / max|W_j|^(1-α)
so the activation outliers shrink and the weight columns grow by the same factor: α = 0.5 meets halfway.
Linears that read the same tensor must share one s (the tensor is divided once), so max|W_j| is taken over
all of their columns j.

The division x / s is free when the op that produces x can absorb it exactly:
  - AdaLN modulation  x = (norm(h)·γ)·(1 + scale) + shift  (scale, shift: rows of a linear's output):
    x / s = (norm(h)·γ/s)·(1 + scale) + shift/s, i.e. the norm's affine weight γ and the shift rows
    (weight and bias) divided by s. A norm without affine weight gets one (γ = 1/s), which LayerNorm
    kernels apply for free. Not the scale rows: (1 + scale)/s would need scale' = (1 + scale)/s - 1, a
    value near -1 whenever s >> 1, whose bf16 rounding (2^-9 absolute) is then a large relative error;
  - a per-channel mix of a linear's outputs (attention: out = softmax(QKᵀ)·V mixes tokens, not channels):
    dividing V's output rows (weight and bias) by s divides `out` by s.
Anything else (e.g. after a GELU) keeps s as an online vector applied before the activation quantizer.
"""
from __future__ import annotations

import torch

S_RANGE = (1e-4, 1e4)   # beyond this a factor only moves rounding error around; keeps fp16/bf16 safe


def column_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_ij| over i, and over every weight in `weights` (all [out_k, C]): the shared-input view, fp32 [C]."""
    cols = {w.shape[1] for w in weights}
    if len(cols) != 1:
        raise ValueError(f"linears sharing an input must have one in_features, got {sorted(cols)}")
    return torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)


def smooth_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                   clamp: tuple[float, float] = S_RANGE) -> torch.Tensor:
    """s_j = a_j^α / w_j^(1-α), clamped to `clamp`; fp32 [C].

    Channels that never fired in calibration (a_j = 0) or have an all-zero weight column get s_j = 1: there
    is nothing to balance, and a 0 or inf factor would not be invertible.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a, w = act_absmax.detach().double().flatten(), weight_absmax.detach().double().flatten()
    if a.shape != w.shape:
        raise ValueError(f"activation absmax has {a.numel()} channels, weight absmax {w.numel()}")
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise ValueError("smooth_factors: non-finite absmax (calibration overflowed?); recapture in fp32")
    live = (a > 0) & (w > 0)
    s = torch.where(live, a.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1.0 - alpha), torch.ones_like(a))
    return s.clamp(*clamp).float()


def scale_columns_(weight: torch.Tensor, s: torch.Tensor) -> None:
    """W <- W·diag(s) in place: the consumer's side of x / s."""
    with torch.no_grad():
        weight.copy_((weight.double() * s.double()[None, :]).to(weight.dtype))


def fold_into_rows_(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor) -> None:
    """Divide a producer's output rows (weight [C, in], bias [C]) by s in place: its output becomes out / s."""
    with torch.no_grad():
        weight.copy_((weight.double() / s.double()[:, None]).to(weight.dtype))
        if bias is not None:
            bias.copy_((bias.double() / s.double()).to(bias.dtype))


def fold_into_modulated_norm_(gamma: torch.Tensor, beta: torch.Tensor | None, shift_weight: torch.Tensor,
                              shift_bias: torch.Tensor | None, s: torch.Tensor) -> None:
    """Make x = (norm(h)·γ + β)·(1 + scale) + shift come out as x / s, in place: γ, β and the shift rows
    (weight [C, in], bias [C] of the modulation linear; pass views of its shift chunk) divided by s."""
    sd = s.double()
    with torch.no_grad():
        for t in (gamma, beta, shift_bias):
            if t is not None:
                t.copy_((t.double() / sd).to(t.dtype))
        shift_weight.copy_((shift_weight.double() / sd[:, None]).to(shift_weight.dtype))
