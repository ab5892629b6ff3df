"""CLEAR's optional pooled keys / values: the image keys (and values) averaged over f x f cells of the token grid with
learned weights, one weight per (head, position in the cell), initialised to 1/f^2 (a plain average). Every query
sees the pooled keys besides its local window, so far-away content still reaches it at a coarse scale.

Grids that f does not divide: the grid is padded at the bottom / right to a multiple of f, and a border cell's
weighted sum is rescaled by f^2 / (real tokens in the cell): at initialisation every cell is then the plain mean of
its real tokens, and any resolution works.
"""
from __future__ import annotations

import torch
from torch import nn


def pooled_grid(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """The pooled grid (ceil(h / f), ceil(w / f))."""
    h, w = grid
    return -(-h // factor), -(-w // factor)


def pool_tokens(x: torch.Tensor, grid: tuple[int, int], factor: int, weight: torch.Tensor) -> torch.Tensor:
    """x: image tokens (B, h*w, H, D), row-major on `grid`; weight: (H, f*f) over the cell's positions (row-major).
    Returns (B, ceil(h/f) * ceil(w/f), H, D), the pooled cells row-major."""
    b, n, heads, d = x.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} image tokens are not a {h}x{w} grid")
    f = factor
    ph, pw = pooled_grid(grid, f)
    x = x.reshape(b, h, w, heads, d)
    pad_h, pad_w = ph * f - h, pw * f - w
    if pad_h or pad_w:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    cells = x.reshape(b, ph, f, pw, f, heads, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, ph, pw, heads, f * f, d)
    out = torch.einsum("bpqhud,hu->bpqhd", cells, weight.to(x.dtype))
    if pad_h or pad_w:   # border cells: the sum over real tokens, rescaled as if the cell were full
        real = torch.zeros(ph * f, pw * f, dtype=x.dtype, device=x.device)
        real[:h, :w] = 1
        count = real.reshape(ph, f, pw, f).sum(dim=(1, 3))
        out = out * (f * f / count)[None, :, :, None, None]
    return out.reshape(b, ph * pw, heads, d)


class KVPool(nn.Module):
    """The learned pooling of one attention module: separate (heads, f*f) weights for keys and values."""

    def __init__(self, heads: int, factor: int, device=None, dtype=None):
        super().__init__()
        if factor < 2:
            raise ValueError(f"pooling factor must be >= 2, got {factor}")
        self.factor = factor
        init = torch.full((heads, factor * factor), 1.0 / factor ** 2, device=device, dtype=dtype)
        self.key_weight = nn.Parameter(init.clone())
        self.value_weight = nn.Parameter(init.clone())

    def forward(self, key: torch.Tensor, value: torch.Tensor, grid: tuple[int, int]):
        """key / value: image tokens (B, h*w, H, D) -> pooled (B, P, H, D) each."""
        return (pool_tokens(key, grid, self.factor, self.key_weight),
                pool_tokens(value, grid, self.factor, self.value_weight))

    def extra_repr(self) -> str:
        return f"heads={self.key_weight.shape[0]}, factor={self.factor}"
