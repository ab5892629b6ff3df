"""Smoothing folded upstream, kept where an adapter can find it.

When `smooth` folds s into a norm or into a producer's output rows, the linear afterwards sees x / s and the
producer emits y / s (on the folded rows). The compressed model needs nothing more, but a LoRA trained on the
original model must see the original input and emit the original scale. So every fold is recorded as a float32
buffer on the block (folds never cross blocks), saved with the block's tensors:

    fold_in__<linear>   [in_features]   the linear's input arrives divided by this
    fold_out__<linear>  [out_features]  the linear's output rows come out divided by this (1 on unfolded rows)

(<linear> is the block-relative name with '.' written '__'.) The manifest op `fold_scale` rebuilds the empty
buffer on the meta model before weights are read. A LoRA layer multiplies its input by fold_in and divides its
output by fold_out (lora/layer.py), which makes the branch what it was on the uncompressed model.
"""
from __future__ import annotations

import torch
from torch import nn

SIDES = ("in", "out")


def buffer_name(side: str, linear: str) -> str:
    if side not in SIDES:
        raise ValueError(f"fold side {side!r} is not one of {SIDES}")
    return f"fold_{side}__{linear.replace('.', '__')}"


def parse_buffer_name(name: str) -> tuple[str, str] | None:
    """(side, block-relative linear name) of a fold buffer, or None for any other buffer."""
    for side in SIDES:
        prefix = f"fold_{side}__"
        if name.startswith(prefix):
            return side, name[len(prefix):].replace("__", ".")
    return None


def fold_entry(block: str, linear: str, side: str, features: int) -> dict:
    return {"op": "fold_scale", "module": block, "linear": linear, "side": side, "features": int(features)}


def _ensure_buffer(block: nn.Module, side: str, linear: str, features: int, device) -> torch.Tensor:
    name = buffer_name(side, linear)
    buf = block._buffers.get(name)
    if buf is None:
        buf = torch.ones(features, dtype=torch.float32, device=device)
        block.register_buffer(name, buf)
    elif buf.shape != (features,):
        raise ValueError(f"{name} holds {tuple(buf.shape)} values, the fold needs ({features},)")
    return buf


def record_fold(model: nn.Module, state, block: str, linear: str, side: str, s: torch.Tensor,
                rows: slice | None = None) -> None:
    """Multiply `block`'s fold_<side> buffer for `linear` by s (on `rows` of it; all by default) and record the
    manifest entry that rebuilds the buffer. Two folds into one linear (the FLUX modulation linear's shift rows
    of attention and FFN) share its buffer."""
    blk = model.get_submodule(block)
    lin = model.get_submodule(f"{block}.{linear}")
    features = lin.in_features if side == "in" else lin.out_features
    fresh = buffer_name(side, linear) not in blk._buffers
    buf = _ensure_buffer(blk, side, linear, features, s.device)
    with torch.no_grad():
        buf[rows if rows is not None else slice(None)] *= s.detach().to(buf.device, torch.float32).reshape(-1)
    if fresh:
        state.record(fold_entry(block, linear, side, features))


def rebuild_fold_scale(model: nn.Module, entry: dict, device) -> None:
    """Manifest op `fold_scale`: the empty fold buffer on the block (several entries may name one buffer)."""
    blk = model.get_submodule(entry["module"])
    blk.get_submodule(entry["linear"])          # AttributeError: the fold names a linear the block lacks
    _ensure_buffer(blk, entry["side"], entry["linear"], int(entry["features"]), device)


def fold_scales(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{full linear name: {"in": tensor, "out": tensor}} for every recorded fold in `model`."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for block_name, blk in model.named_modules():
        for name, buf in blk._buffers.items():
            parsed = parse_buffer_name(name)
            if parsed is not None and buf is not None:
                side, linear = parsed
                full = f"{block_name}.{linear}" if block_name else linear
                out.setdefault(full, {})[side] = buf
    return out


def unrecorded_folds(model: nn.Module) -> bool:
    """True for a model loaded from an artifact written before folds were recorded: its manifest folds smoothing
    into norms (`affine_norm`) but holds no `fold_scale` entry, so what its linears see cannot be undone."""
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    manifest = cfg.get("manifest", []) if isinstance(cfg, dict) else getattr(cfg, "manifest", [])
    ops = {e.get("op") for e in manifest or []}
    return "affine_norm" in ops and "fold_scale" not in ops
