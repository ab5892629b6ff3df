"""torch-pruning `Group`s of a block's units (heads, each FFN's neurons), for its importance estimators.

torch-pruning's DependencyGraph, traced on one block, finds the FFN groups of dual-stream blocks exactly
(up rows + down columns) and is used for them (`dependency_groups`); it does not model the attention heads nor
the single block's [attention | MLP] concatenation: its trace treats the sequence-dim concatenation of text and
image tokens as a channel concatenation, maps head channels to head_dim entries of the qk-norm weights and to
shifted columns of to_add_out, and couples the single block's proj_mlp with to_q/k/v. Those groups are written
out here from the layout instead (`unit_groups`), as torch-pruning `Group`s, so its importance estimators and
pruning functions work on them unchanged.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch_pruning import DependencyGraph
from torch_pruning import _helpers as _tp_helpers
from torch_pruning.dependency import Dependency as _Dependency, Group as _Group
from torch_pruning.dependency.node import Node as _Node

from .width import IN, OUT, BlockShape, WidthLayout, _lin, block_shape, layout_for


def _item(module: nn.Module, name: str, fn, idxs: list[int], root: list[int]):
    node = _Node(module, None, name)
    it = _tp_helpers.GroupItem(dep=_Dependency(fn, fn, node, node), idxs=list(idxs))
    it.root_idxs = list(root)
    return it


def _group(items) -> "_Group":
    g = _Group()
    g._group = list(items)
    return g


def head_group(block: nn.Module, layout: WidthLayout, heads: list[int] | None = None) -> "_Group":
    """The torch-pruning group of the heads `heads` (default: all): their rows of every q/k/v projection and their
    columns of every output projection; root index = the head, so an importance reduces to one score per head."""
    shape = block_shape(block, layout)
    hd = shape.head_dim
    heads = list(range(shape.heads)) if heads is None else list(heads)
    chans = [h * hd + j for h in heads for j in range(hd)]
    root = [h for h in heads for _ in range(hd)]
    items = [_item(_lin(block, n), n, OUT, chans, root) for n in layout.qkv]
    items += [_item(_lin(block, n), n, IN, chans, root) for n in layout.out]
    return _group(items)


def ffn_group(block: nn.Module, layout: WidthLayout, key: str, neurons: list[int] | None = None) -> "_Group":
    """The torch-pruning group of FFN `key`'s neurons (default: all): up-projection rows, down-projection columns."""
    f = layout.ffn(key)
    shape = block_shape(block, layout)
    neurons = list(range(shape.ffn[key])) if neurons is None else list(neurons)
    offset = shape.heads * shape.head_dim if f.after_heads else 0
    return _group([_item(_lin(block, f.up), f.up, OUT, neurons, neurons),
                   _item(_lin(block, f.down), f.down, IN, [offset + i for i in neurons], neurons)])


def _block_example(block: nn.Module, stream: str, shape: BlockShape, adapter) -> dict:
    p = next(block.parameters())
    dim = _lin(block, layout_for(adapter, stream).qkv[0]).in_features
    g = torch.Generator().manual_seed(0)
    kw = dict(device=p.device, dtype=p.dtype)
    out = {"hidden_states": torch.randn(1, 4, dim, generator=g).to(**kw),
           "encoder_hidden_states": torch.randn(1, 2, dim, generator=g).to(**kw),
           "temb": torch.randn(1, dim, generator=g).to(**kw)}
    if adapter.name == "qwenimage":
        out["encoder_hidden_states_mask"] = torch.ones(1, 2, **kw)
    return out


def dependency_groups(block: nn.Module, adapter, stream: str) -> dict[str, "_Group"]:
    """FFN groups found by torch-pruning's DependencyGraph traced on this block alone (4 image + 2 text tokens),
    for the FFNs where it finds exactly the layout's group (up rows + down columns, nothing else): dual-stream
    blocks' FFNs. The others (heads, FLUX single blocks' MLP) are left to `unit_groups`' layout groups."""
    layout = layout_for(adapter, stream)
    shape = block_shape(block, layout)
    example = _block_example(block, stream, shape, adapter)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "will prune the last non-singleton dimension" of the qk-norm weights
        dg = DependencyGraph().build_dependency(block, example_inputs=example,
                                                   forward_fn=lambda m, x: tuple(adapter.run_block(m, x).values()))
    names = {m: n for n, m in block.named_modules()}
    found = {}
    for f in layout.ffns:
        if f.after_heads:
            continue
        n = shape.ffn[f.key]
        g = dg.get_pruning_group(_lin(block, f.up), OUT, idxs=list(range(n)))
        linears = {(names.get(dep.target.module), dep.handler.__name__, tuple(idxs))
                   for dep, idxs in g if isinstance(dep.target.module, nn.Linear)}
        want = {(f.up, OUT.__name__, tuple(range(n))), (f.down, IN.__name__, tuple(range(n)))}
        if linears == want:
            found[f.key] = g
    return found


def unit_groups(block: nn.Module, adapter, stream: str, use_dependency_graph: bool = True) -> dict[str, "_Group"]:
    """Every unit group of a block with full indices, for importance estimation: "heads" and each FFN key.
    Dual-stream FFNs come from torch-pruning's DependencyGraph when it finds them exactly (`dependency_groups`)."""
    layout = layout_for(adapter, stream)
    groups = {"heads": head_group(block, layout)}
    traced = dependency_groups(block, adapter, stream) if use_dependency_graph else {}
    for f in layout.ffns:
        groups[f.key] = traced.get(f.key) or ffn_group(block, layout, f.key)
    return groups
