"""SVDQuant's low-rank branch: a rank-r part of the weight kept in 16 bits, only the residual quantized.

    W = U·Vᵀ + R,   U·Vᵀ the top-r SVD of W (in the basis the quantizer sees: smoothed and rotated)
    y = Q(x)·Q(R)ᵀ + (x·Vᵀᵀ)·Uᵀ   the branch reads x before activation quantization

Smoothing moves activation outliers into W's columns; the few large singular directions they create go to the
branch, so the residual R has a smaller range and quantizes with less error (arXiv 2411.05007). The factors
are stored in bf16 and the residual is computed from the *rounded* factors, so the quantizer (and GPTQ) see
exactly the part the branch does not reproduce.
"""
from __future__ import annotations

import torch

BRANCH_DTYPE = torch.bfloat16


def lowrank_split(w: torch.Tensor, rank: int, dtype: torch.dtype = BRANCH_DTYPE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) in `dtype`, the best rank-r approximation of `w` [out, in] up·down, each
    factor carrying √σ (balanced ranges for bf16), and the fp32 residual w - up·down of the rounded factors."""
    out_f, in_f = w.shape
    if not 0 < rank < min(out_f, in_f):
        raise ValueError(f"low-rank branch rank {rank} must lie in 1 .. {min(out_f, in_f) - 1} for a "
                         f"{out_f} x {in_f} weight")
    w32 = w.detach().float()
    u, s, vh = torch.linalg.svd(w32, full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(dtype)
    down = (root[:, None] * vh[:rank]).to(dtype)
    residual = w32 - up.float() @ down.float()
    return up, down, residual


def branch_forward(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """(x·downᵀ)·upᵀ in x's dtype: two thin matmuls, never the [out, in] product."""
    return (x @ down.to(x.dtype).t()) @ up.to(x.dtype).t()
