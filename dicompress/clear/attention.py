"""`clear_attention`: the one entry point the CLEAR attention processors call. Today it runs the dense masked
reference (quadratic); the linear-cost execution path replaces the body here, tested against the reference."""
from __future__ import annotations

import torch

from .window import reference_clear_attention


def clear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_text: int,
                    grid: tuple[int, int], radius: float, pooled_key: torch.Tensor | None = None,
                    pooled_value: torch.Tensor | None = None) -> torch.Tensor:
    """query/key/value (B, N, H, D) in [text | image] order, N = n_text + h * w; returns (B, N, H, D)."""
    return reference_clear_attention(query, key, value, n_text=n_text, grid=grid, radius=radius,
                                     pooled_key=pooled_key, pooled_value=pooled_value)
