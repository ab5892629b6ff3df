"""CLEAR (conv-like linearization): image queries attend to text keys, to image keys inside a circular window on the
token grid and optionally to learned pooled keys; text queries attend to everything.

window.py: the mask as a pure function of (text tokens, grid, radius) and the dense masked reference;
attention.py: `clear_attention`, the entry point processors call (picks the execution path: cpu_local.py for
CPU inference, tiled.py with autograd or on other devices, the dense reference for small grids).
"""
from .attention import clear_attention
from .window import clear_mask, reference_clear_attention

__all__ = ["clear_attention", "clear_mask", "reference_clear_attention"]
