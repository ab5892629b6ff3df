"""The output error of a linear under an input transform and W/A quantization, as pure functions.

For calibration inputs X [tokens, C], weight W [out, C] and an invertible input transform T (smoothing
diag(1/s), a rotation Q, or both: T = diag(1/s)·Q), the quantized layer computes
    Qa(X·T) · Qw(W·diag(s)·Q)ᵀ      (W·diag(s)·Q = (T⁻¹·Wᵀ)ᵀ for orthogonal Q)
and its error against the float layer is ||X·Wᵀ - Qa(X·T)·Qw(Tᵀ-folded W)ᵀ||²_F. Linears that read one
tensor (an InputGroup) share T, so a candidate's error is summed over the group's linears. The weight
quantizer is nearest rounding on the recipe's grid (`rounding`) or GPTQ on that grid with the Hessian of the
same transformed inputs (`gptq`); the activation quantizer is the per-token one the `act_quant` pass applies
(symmetric, or asymmetric with a zero point).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .activation import quantize_per_token
from .gptq import gptq_codes

# (w fp32 [out, in], bits) -> w_hat fp32 [out, in]: the recipe's weight quantizer, per output channel
WeightQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class WeightGrid:
    """A weight codec's three functions (quant/tlq.py, quant/uniform.py): grid search, dequantize, column
    quantizer on a fixed grid (GPTQ)."""
    quantize: Callable
    dequantize: Callable
    column_quantizer: Callable

    def rounding(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        codes, buffers, _ = self.quantize(w, bits, None)
        return self.dequantize(codes, buffers, bits, None).float()

    def gptq(self, w: torch.Tensor, bits: int, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
        """GPTQ codes on the grid nearest rounding chose, as the weight passes do (gptq: true)."""
        _, buffers, _ = self.quantize(w, bits, None)
        codes = gptq_codes(w, hessian, self.column_quantizer(buffers, bits, None), damp=damp)
        return self.dequantize(codes, buffers, bits, None).float()


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """E[xᵀx] over the rows of x [tokens, C], float32 (what calib/hessian.py accumulates)."""
    xd = x.double()
    return (xd.T @ xd / max(x.shape[0], 1)).float()


def quantized_output_errors(x: torch.Tensor, w: torch.Tensor, xt: torch.Tensor, wt: torch.Tensor, w_bits: int,
                            a_bits: int | None, grid: WeightGrid, gptq: bool = False,
                            zero_points: tuple[bool, ...] = (False,)) -> list[tuple[float, float]]:
    """(||x·wᵀ - Qa(xt)·Qw(wt)ᵀ||², ||x·wᵀ||²) in float64 for each activation grid in `zero_points` (symmetric,
    asymmetric), the weight quantized once. x, w: the float layer; xt, wt: the same layer in a transformed basis
    (xt·wtᵀ = x·wᵀ up to float rounding). a_bits None: activations stay float (one entry)."""
    wt = wt.detach().float()
    w_hat = (grid.gptq(wt, w_bits, input_hessian(xt)) if gptq else grid.rounding(wt, w_bits)).double()
    ref = x.double() @ w.double().T
    signal = float(ref.pow(2).sum())
    out = []
    for zp in (zero_points if a_bits is not None else (False,)):
        xq = xt.float() if a_bits is None else quantize_per_token(xt.float(), a_bits, zp)
        out.append((float((ref - xq.double() @ w_hat.T).pow(2).sum()), signal))
    return out


def quantized_output_error(x: torch.Tensor, w: torch.Tensor, xt: torch.Tensor, wt: torch.Tensor, w_bits: int,
                           a_bits: int | None, grid: WeightGrid, gptq: bool = False,
                           zero_point: bool = False) -> tuple[float, float]:
    """quantized_output_errors for one activation grid."""
    return quantized_output_errors(x, w, xt, wt, w_bits, a_bits, grid, gptq, (zero_point,))[0]


def error_db(noise: float, signal: float) -> float | None:
    """Output SQNR in dB (None when exact)."""
    if noise <= 0:
        return None
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf
