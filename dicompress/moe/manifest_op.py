"""Manifest op `moe_ffn` (registered in io/manifest.py, which imports this lazily): at load time, the dense FeedForward at `module` becomes an empty MoEFFN of the entry's
shape (on the meta model, before the weights are read), so `from_pretrained(artifact)` and `dicompress.load`
give the MoE model. Entry: {op, module, dim, hidden (the dense width it replaced), shared, expert_width, experts,
top_k, bias, approximate}."""
from __future__ import annotations

from torch import nn

from ..nn.surgery import set_module
from .experts import MoEFFN, dense_parts


def moe_entry(name: str, moe: MoEFFN, hidden: int) -> dict:
    return {"op": "moe_ffn", "module": name, "hidden": int(hidden), **moe.spec()}


def rebuild_moe_ffn(model: nn.Module, entry: dict, device) -> None:
    name = entry["module"]
    old = model.get_submodule(name)          # AttributeError names a missing module
    d = dense_parts(old)                      # ValueError: not the dense FFN the entry says was split
    dim, hidden = d["w1"].shape[1], d["w1"].shape[0]
    if (dim, hidden) != (entry["dim"], entry["hidden"]):
        raise ValueError(f"{name} is an FFN {dim} -> {hidden}, the manifest says {entry['dim']} -> {entry['hidden']}")
    if entry["shared"] + entry["experts"] * entry["expert_width"] != hidden:
        raise ValueError(f"{name}: shared {entry['shared']} + {entry['experts']} x {entry['expert_width']} neurons "
                         f"is not the FFN's {hidden}")
    set_module(model, name, MoEFFN(dim, int(entry["shared"]), int(entry["expert_width"]), int(entry["experts"]),
                                   int(entry["top_k"]), bias=bool(entry["bias"]), approximate=entry["approximate"],
                                   device=device, dtype=d["w1"].dtype))
