"""Manifest op `moe_ffn` (registered in io/manifest.py, which imports this lazily): at load time, the dense FeedForward at `module` becomes an empty MoEFFN of the entry's
shape (on the meta model, before the weights are read), so `from_pretrained(artifact)` and `dicompress.load`
give the MoE model. Entry: {op, module, dim, hidden (the dense width it replaced), shared, expert_width, experts,
top_k, bias, approximate}; a FLUX single block's MLP: `module` is the block and `ffn: mlp` (moe/single.py)."""
from __future__ import annotations

from torch import nn

from ..nn.surgery import set_module
from .experts import MoEFFN, dense_parts
from .single import MLP, empty_single_moe, single_mlp_parts


def moe_entry(name: str, moe: MoEFFN, hidden: int, ffn: str | None = None) -> dict:
    return {"op": "moe_ffn", "module": name, "hidden": int(hidden), **({"ffn": ffn} if ffn else {}), **moe.spec()}


def rebuild_moe_ffn(model: nn.Module, entry: dict, device) -> None:
    name = entry["module"]
    old = model.get_submodule(name)          # AttributeError names a missing module
    single = entry.get("ffn") == MLP
    # ValueError: not the dense FFN the entry says was split
    d = single_mlp_parts(old) if single else dense_parts(old)
    dim, hidden = d["w1"].shape[1], d["w1"].shape[0]
    if (dim, hidden) != (entry["dim"], entry["hidden"]):
        raise ValueError(f"{name} is an FFN {dim} -> {hidden}, the manifest says {entry['dim']} -> {entry['hidden']}")
    if entry["shared"] + entry["experts"] * entry["expert_width"] != hidden:
        raise ValueError(f"{name}: shared {entry['shared']} + {entry['experts']} x {entry['expert_width']} neurons "
                         f"is not the FFN's {hidden}")
    moe = MoEFFN(dim, int(entry["shared"]), int(entry["expert_width"]), int(entry["experts"]), int(entry["top_k"]),
                 bias=bool(entry["bias"]), approximate=entry["approximate"], device=device, dtype=d["w1"].dtype)
    if single:
        empty_single_moe(old, moe, device, d["w1"].dtype)
    else:
        set_module(model, name, moe)
