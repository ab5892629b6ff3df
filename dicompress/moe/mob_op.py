"""Manifest op `mob_gate` (registered in io/manifest.py, which imports this lazily): at load time the block at
`module` becomes a gated block (moe/blocks.py) with an empty router, on the meta model before the weights are
read, so `from_pretrained(artifact)` and `dicompress.load` give the Mixture-of-Blocks model. The block's own
state-dict keys do not change; the router adds `<module>.mob_router.weight` / `.bias`.
Entry: {op, module, dim (the router's temb width), block (the block class it gated)}."""
from __future__ import annotations

from torch import nn

from .blocks import BlockRouter, base_class, gate_block, is_gated


def mob_entry(name: str, block: nn.Module) -> dict:
    router: BlockRouter = block.mob_router
    return {"op": "mob_gate", "module": name, "dim": int(router.weight.shape[1]),
            "block": base_class(block).__name__}


def rebuild_mob_gate(model: nn.Module, entry: dict, device) -> None:
    name = entry["module"]
    block = model.get_submodule(name)            # AttributeError names a missing module
    if is_gated(block):
        raise ValueError(f"{name} is gated twice in the manifest")
    if type(block).__name__ != entry["block"]:
        raise ValueError(f"{name} is a {type(block).__name__}, the manifest gated a {entry['block']}")
    dtype = next(block.parameters()).dtype
    gate_block(block, int(entry["dim"]), device=device, dtype=dtype)
