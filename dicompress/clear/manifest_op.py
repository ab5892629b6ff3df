"""Manifest op `clear_attention` (registered in io/manifest.py, which imports this lazily): at load time the
attention module at `module` gets its CLEAR processor (window radius, and empty pooling weights of the entry's
factor that the stored tensors then fill), and the transformer its grid-reading pre-hook, so
`FluxTransformer2DModel.from_pretrained(artifact)` (or `QwenImageTransformer2DModel`'s) gives the CLEAR model at any
resolution.
Entry: {op, module, radius, pooling (factor or null), heads, grid (the calibration's [h, w]: blocks run on
their own, outside the transformer's forward, assume it)}."""
from __future__ import annotations

from torch import nn

from .processor import clear_kind, install_clear


def clear_entry(name: str, attn: nn.Module, radius: float, pooling: int | None, grid: tuple[int, int]) -> dict:
    return {"op": "clear_attention", "module": name, "radius": float(radius),
            "pooling": int(pooling) if pooling else None, "heads": int(attn.heads), "grid": [int(g) for g in grid]}


def rebuild_clear_attention(model: nn.Module, entry: dict, device) -> None:
    name = entry["module"]
    attn = model.get_submodule(name)          # AttributeError names a missing module
    if clear_kind(attn) is None:
        raise ValueError(f"{name} is a {type(attn).__name__} with processor "
                         f"{type(getattr(attn, 'processor', None)).__name__}, not FLUX or Qwen-Image attention")
    if int(attn.heads) != int(entry["heads"]):
        raise ValueError(f"{name} has {attn.heads} heads, the manifest says {entry['heads']}")
    install_clear(model, [name], float(entry["radius"]), entry.get("pooling"), entry.get("grid"))
