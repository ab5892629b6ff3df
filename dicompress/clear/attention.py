"""`clear_attention`: the one entry point the CLEAR attention processors call. It picks the execution path:

- "tiled" (clear/tiled.py): block-sparse tiles of the image grid, cost linear in the token count; chosen whenever
  it computes at most half the (query, key) pairs of the dense masked path;
- "dense": the masked reference (window.py), quadratic, for grids so small that a tile's window covers most of
  the grid (the embedded model's 8x8 grid at radius 3: a tile's window is the whole grid).

Both are differentiable and agree to rounding (tests/test_clear_attention.py); the choice depends only on the
shapes, so training and inference at one resolution run the same path.
"""
from __future__ import annotations

import torch

from .tiled import tiled_clear_attention, tiled_flops
from .window import reference_clear_attention


def dense_masked_flops(n_text: int, grid: tuple[int, int], n_pooled: int, heads: int, head_dim: int,
                       batch: int = 1) -> int:
    n = n_text + grid[0] * grid[1]
    return 4 * batch * heads * head_dim * n * (n + n_pooled)


def clear_path(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int = 0) -> str:
    """'tiled' or 'dense' for these shapes (the FLOP ratio does not depend on heads, head_dim or batch)."""
    tiled = tiled_flops(n_text, grid, radius, n_pooled, 1, 1)
    return "tiled" if 2 * tiled <= dense_masked_flops(n_text, grid, n_pooled, 1, 1) else "dense"


def path_flops(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int, heads: int, head_dim: int,
               batch: int = 1) -> int:
    """FLOPs (Q K^T and P V) of the path clear_attention takes for these shapes."""
    if clear_path(n_text, grid, radius, n_pooled) == "tiled":
        return tiled_flops(n_text, grid, radius, n_pooled, heads, head_dim, batch)
    return dense_masked_flops(n_text, grid, n_pooled, heads, head_dim, batch)


def clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_text: int,
                    grid: tuple[int, int], radius: float, pooled_key: torch.Tensor | None = None,
                    pooled_value: torch.Tensor | None = None) -> torch.Tensor:
    """query/key/value (B, N, H, D) in [text | image] order, N = n_text + h * w; returns (B, N, H, D)."""
    n_pooled = 0 if pooled_key is None else pooled_key.shape[1]
    run = tiled_clear_attention if clear_path(n_text, grid, radius, n_pooled) == "tiled" else reference_clear_attention
    return run(query, key, value, n_text=n_text, grid=grid, radius=radius, pooled_key=pooled_key,
               pooled_value=pooled_value)
