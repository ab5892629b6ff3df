"""GPTQ error feedback over any fixed per-row weight grid (Frantar et al., 2022), as pure functions.

The grid (TLQ's log grids and scales, or RTN's scales and zeros) is chosen first from the weight, as
without GPTQ; GPTQ then only changes which level each weight takes. Columns are quantized one at a
time, and each column's rounding error is pushed onto the columns not yet quantized through the
inverse Hessian of the layer's calibration inputs, H = XᵀX / n, so that the layer's *output*
error ||(W - Ŵ)Xᵀ||² is what is minimised, not the weight error. Same storage, same decoder: only the
codes differ.

Column order: by decreasing diag(H) ("act order": channels that carry the most input energy are
quantized first, while there is still freedom left to compensate them). The grid is fixed per row and
group before the search, so the order needs no bookkeeping of group boundaries.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# (column values [out], column index in the original order) -> (codes [out], decoded values [out])
ColumnQuantizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


# float64 costs 8·n² bytes per [n, n] matrix: 1.9 GB at the 15360 inputs of FLUX's single-block proj_out. Wider
# layers than this run in float32, as reference GPTQ does throughout (damping keeps the factorisation stable).
FLOAT64_MAX_IN = 4096


def gptq_dtype(n: int) -> torch.dtype:
    return torch.float64 if n <= FLOAT64_MAX_IN else torch.float32


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹, in `h`'s dtype and memory (on the CPU through
    LAPACK in place: torch's factorisations each allocate another [n, n], 0.9 GB at 15360 inputs); U[i, i:]
    carries column i's error onto the later columns. Raises ValueError when H is not positive definite even
    after damping."""
    d = torch.arange(h.shape[0], device=h.device)
    h[d, d] += damp * float(h.diagonal().mean().clamp(min=1e-12))
    if h.device.type != "cpu" or not h.is_contiguous():
        L, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            raise ValueError(_NOT_PD)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    from scipy.linalg import lapack
    potrf, potri = (lapack.dpotrf, lapack.dpotri) if h.dtype == torch.float64 else (lapack.spotrf, lapack.spotri)
    a = h.numpy().T                    # H is symmetric: its transpose is the same matrix, Fortran-ordered
    c, info = potrf(a, lower=0, clean=0, overwrite_a=1)        # H = R^T R, R in a's upper triangle
    if info != 0:
        raise ValueError(_NOT_PD)
    inv, info = potri(c, lower=0, overwrite_c=1)               # H^-1 (upper triangle)
    if info != 0:
        raise ValueError(_NOT_PD)
    u, info = potrf(inv, lower=0, clean=1, overwrite_a=1)      # H^-1 = U^T U
    if info != 0 or not np.shares_memory(u, a):
        raise ValueError(_NOT_PD if info != 0 else "LAPACK did not factor the Hessian in place")
    return h.T                         # a (Fortran order) is h's memory: U = h.T


_NOT_PD = "the calibration Hessian is not positive definite after damping; raise gptq_damp"


def permute_symmetric_(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """h <- h[perm][:, perm] in place, one row / column of scratch (following the permutation's cycles), where
    a copy would double the memory of a [15360, 15360] Hessian."""
    p = perm.tolist()
    for view in (h, h.T):                      # rows, then columns (rows of the transposed view)
        seen = [False] * len(p)
        for start in range(len(p)):
            if seen[start] or p[start] == start:
                seen[start] = True
                continue
            scratch, i = view[start].clone(), start
            while True:                        # new[i] = old[p[i]] along the cycle through `start`
                seen[i] = True
                if p[i] == start:
                    view[i].copy_(scratch)
                    break
                view[i].copy_(view[p[i]])
                i = p[i]
    return h


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, quant_col: ColumnQuantizer, *, damp: float = 0.01,
               block_size: int = 128, act_order: bool = True, overwrite: bool = False) -> torch.Tensor:
    """Codes int64 [out, in] for w [out, in] given H [in, in] (the layer's input second moment) and a
    column quantizer on a fixed grid (codes of up to 8 bits). Math in float64 up to FLOAT64_MAX_IN inputs,
    float32 above. `overwrite`: work in `hessian`'s memory (a float32 H of a wide layer is then not copied)."""
    out, n = w.shape
    if hessian.shape != (n, n):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match in_features {n}")
    dtype = gptq_dtype(n)
    diag = hessian.diagonal().to(dtype)
    dead = diag == 0                               # inputs that were always zero: any level is exact there
    perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True) if act_order \
        else torch.arange(n, device=w.device)
    W = w.detach().to(dtype)[:, perm]
    H = hessian.detach() if overwrite and hessian.dtype == dtype else hessian.detach().to(dtype, copy=True)
    permute_symmetric_(H, perm)
    dead = dead[perm]
    H[dead, dead] = 1.0
    U = inverse_hessian_factor(H, damp)
    codes = torch.empty(out, n, dtype=torch.uint8, device=w.device)   # int64 would be twice the fp32 weight
    for b0 in range(0, n, block_size):
        b1 = min(n, b0 + block_size)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        err = torch.empty_like(Wb)
        for j in range(b1 - b0):
            col = Wb[:, j]
            c, q = quant_col(col.float(), int(perm[b0 + j]))
            codes[:, perm[b0 + j]] = c.to(torch.uint8)
            e = (col - q.to(dtype)) / Ub[j, j]
            Wb[:, j + 1:] -= e[:, None] * Ub[j, j + 1:][None, :]
            err[:, j] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]
    del W, H, U
    return codes.long()


def hessian_quadratic_forms(mats: list[torch.Tensor], h_rows) -> list[float]:
    """tr(M H Mᵀ) for each M [out, in], H given as row blocks (r0, H[r0:r1]) so that it need not be in memory
    whole: each block adds sum((H[r0:r1] Mᵀ) ⊙ M[:, r0:r1]ᵀ), an [r1 - r0, out] product."""
    totals, cast = [0.0] * len(mats), None
    for r0, hr in h_rows:
        dtype = gptq_dtype(hr.shape[1])
        cast = cast or [m.to(dtype) for m in mats]
        hr = hr.to(dtype)
        for i, m in enumerate(cast):
            totals[i] += float(((hr @ m.T) * m[:, r0:r0 + hr.shape[0]].T).sum(dtype=torch.float64))
    return totals


def sqnr_db(signal: float, noise: float) -> float:
    return float("inf") if noise <= 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def output_sqnr_db(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, rows: int = 256) -> float:
    """SQNR of the layer's output on the calibration inputs: tr(W H Wᵀ) / tr(E H Eᵀ), E = W - Ŵ, in dB."""
    blocks = ((r0, hessian[r0:r0 + rows]) for r0 in range(0, hessian.shape[0], rows))
    return sqnr_db(*hessian_quadratic_forms([w, w - w_hat], blocks))
