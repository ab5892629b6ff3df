"""`clear_attention`: the one entry point the CLEAR attention processors call. It picks the execution path:

- "cpu-local" (clear/cpu_local.py): on CPU without autograd (inference): torch's fused CPU flash-attention kernel on
  tiles of image queries against the gathered union of their circles, text keys in one separate call, merged by
  log-sum-exp; cost linear in the token count;
- "tiled" (clear/tiled.py): block-sparse tiles of the image grid in plain torch ops, cost linear in the token count,
  differentiable: with autograd (the distillation) and on other devices;
- "dense": the masked reference (window.py), quadratic, for grids so small that a tile's window covers most of
  the grid (the embedded model's 8x8 grid at radius 3: a tile's window is the whole grid).

A linear path is taken when it computes no more (query, key) pairs than the dense masked path ("cpu-local"; measured:
at equal pair counts the two take about the same time, 32x32 r = 16: 100 vs 105 ms) or at most half ("tiled", whose
square windows and extra passes cost more per pair). All paths agree to rounding (tests/test_clear_attention.py); the
choice depends only on shapes, device and whether autograd records, so training and inference at one resolution
compute the same function.
"""
from __future__ import annotations

import torch

from . import cpu_local
from .tiled import tiled_clear_attention, tiled_flops
from .window import reference_clear_attention


def dense_masked_flops(n_text: int, grid: tuple[int, int], n_pooled: int, heads: int, head_dim: int,
                       batch: int = 1) -> int:
    n = n_text + grid[0] * grid[1]
    return 4 * batch * heads * head_dim * n * (n + n_pooled)


def clear_path(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int = 0, *, cpu_inference: bool = True
               ) -> str:
    """'cpu-local', 'tiled' or 'dense' for these shapes (the FLOP ratios do not depend on heads, head_dim or batch).
    cpu_inference: the call runs on CPU without autograd (the cpu-local kernel applies)."""
    dense = dense_masked_flops(n_text, grid, n_pooled, 1, 1)
    if cpu_inference and cpu_local.local_flops(n_text, grid, radius, n_pooled, 1, 1) <= dense:
        return "cpu-local"
    return "tiled" if 2 * tiled_flops(n_text, grid, radius, n_pooled, 1, 1) <= dense else "dense"


def path_flops(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int, heads: int, head_dim: int,
               batch: int = 1, *, cpu_inference: bool = True) -> int:
    """FLOPs (Q K^T and P V) of the path clear_attention takes for these shapes."""
    path = clear_path(n_text, grid, radius, n_pooled, cpu_inference=cpu_inference)
    count = {"cpu-local": cpu_local.local_flops, "tiled": tiled_flops}.get(path)
    if count is None:
        return dense_masked_flops(n_text, grid, n_pooled, heads, head_dim, batch)
    return count(n_text, grid, radius, n_pooled, heads, head_dim, batch)


def clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_text: int,
                    grid: tuple[int, int], radius: float, pooled_key: torch.Tensor | None = None,
                    pooled_value: torch.Tensor | None = None) -> torch.Tensor:
    """query/key/value (B, N, H, D) in [text | image] order, N = n_text + h * w; returns (B, N, H, D)."""
    n_pooled = 0 if pooled_key is None else pooled_key.shape[1]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (query, key, value, pooled_key, pooled_value))
    path = clear_path(n_text, grid, radius, n_pooled, cpu_inference=not grad and cpu_local.available(query))
    run = {"cpu-local": cpu_local.cpu_clear_attention, "tiled": tiled_clear_attention}.get(path,
                                                                                          reference_clear_attention)
    return run(query, key, value, n_text=n_text, grid=grid, radius=radius, pooled_key=pooled_key,
               pooled_value=pooled_value)
