"""The CLEAR attention pattern as pure functions. Sequence layout is diffusers' joint order: [text | image], image
tokens row-major on an (h, w) grid. A query may see a key if the query is text, or the key is text, or both are image
tokens with (dy^2 + dx^2) < r^2. Pooled keys (extra, appended after the sequence) are seen by image queries and by
text queries alike (text queries see everything)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_offsets(h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each image token (row-major)."""
    idx = torch.arange(h * w, device=device)
    return idx // w, idx % w


def check_clear_shapes(n: int, n_text: int, grid: tuple[int, int], radius: float) -> None:
    """The sequence is text + the image grid, and the radius is positive (every CLEAR path's contract)."""
    h, w = grid
    if n != n_text + h * w:
        raise ValueError(f"sequence of {n} tokens is not {n_text} text + {h}x{w} image tokens")
    if radius <= 0:
        raise ValueError(f"CLEAR radius must be > 0, got {radius}")


def clear_mask(n_text: int, grid: tuple[int, int], radius: float, n_pooled: int = 0, device=None) -> torch.Tensor:
    """Boolean (N, N + n_pooled) mask, True = may attend; N = n_text + h * w."""
    h, w = grid
    if radius <= 0:
        raise ValueError(f"CLEAR radius must be > 0, got {radius}")
    rows, cols = grid_offsets(h, w, device)
    dy = rows[:, None] - rows[None, :]
    dx = cols[:, None] - cols[None, :]
    local = (dy * dy + dx * dx) < radius * radius
    n = n_text + h * w
    mask = torch.ones(n, n + n_pooled, dtype=torch.bool, device=device)
    mask[n_text:, n_text:n] = local
    return mask


def reference_clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_text: int,
                              grid: tuple[int, int], radius: float, pooled_key: torch.Tensor | None = None,
                              pooled_value: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked attention (quadratic): the ground truth every fast path is tested against.
    query/key/value: (B, N, H, D) as diffusers' dispatch_attention_fn takes them; pooled_*: (B, P, H, D)."""
    n = query.shape[1]
    h, w = grid
    if n != n_text + h * w:
        raise ValueError(f"sequence of {n} tokens is not {n_text} text + {h}x{w} image tokens")
    if pooled_key is not None:
        key = torch.cat([key, pooled_key], dim=1)
        value = torch.cat([value, pooled_value], dim=1)
    n_pooled = 0 if pooled_key is None else pooled_key.shape[1]
    mask = clear_mask(n_text, grid, radius, n_pooled, device=query.device)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)
