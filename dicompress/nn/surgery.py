"""Module surgery in one place: find, replace and select submodules by dotted name."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Iterator

from torch import nn

from .act import TransformedLinear


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace `model.<name>` by `new`; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch against the full dotted name (`proj_out` matches only the top-level proj_out)."""
    return any(fnmatchcase(name, p) for p in patterns)


def iter_linears(model: nn.Module, include: Iterable[str],
                 exclude: Iterable[str] = ()) -> Iterator[tuple[str, nn.Linear]]:
    """Float linears (plain nn.Linear, or a TransformedLinear carrying an input transform) whose names match
    `include` and none of `exclude`, in model order. Subclasses of other kinds (e.g. LoRA layers) are not taken."""
    include, exclude = list(include), list(exclude)
    for name, mod in model.named_modules():
        if type(mod) in (nn.Linear, TransformedLinear) and matches(name, include) and not matches(name, exclude):
            yield name, mod


def affine_layernorm(norm: nn.LayerNorm, device=None, dtype=None) -> nn.LayerNorm:
    """A LayerNorm computing what `norm` (elementwise_affine=False) does, with an affine weight γ = 1 (no
    bias): one tensor a per-channel scale can be folded into, applied for free by LayerNorm kernels."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is not None:
        raise ValueError(f"expected a LayerNorm without affine weight, got {norm}")
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=True, bias=False,
                        device=device, dtype=dtype)


def affine_norm_entry(name: str, norm: nn.LayerNorm) -> dict:
    """The manifest entry that replays `affine_layernorm` on module `name`."""
    return {"op": "affine_norm", "module": name, "normalized_shape": list(norm.normalized_shape), "eps": norm.eps}


def set_block_list(model: nn.Module, adapter, attr: str, blocks: list[nn.Module]) -> None:
    """Replace the block list `attr` (e.g. "transformer_blocks") by `blocks` and write its new length into the
    model's config, so the saved config.json describes the pruned depth and diffusers builds exactly it."""
    key = adapter.block_count_keys.get(attr)
    if key is None:
        raise ValueError(f"{adapter.name}: no config key is known for the block list {attr!r}")
    setattr(model, attr, nn.ModuleList(blocks))
    model.register_to_config(**{key: len(blocks)})
