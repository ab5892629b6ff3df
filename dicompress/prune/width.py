"""Width pruning: remove whole attention heads and FFN hidden neurons from the blocks, physically.

The one entry point for every width method (width_prune's magnitude / Taylor / random importances, mask_prune's
learned masks): `prune_width(model, adapter, keep)` takes, per block, the indices of the heads and FFN neurons
to KEEP (`BlockKeep`), whatever importance chose them, removes the others from the weights with
torch-pruning's pruning functions, updates the attributes diffusers' attention reads (`heads`, `inner_dim`),
and returns one manifest entry per block (`op: width`, the kept widths), which `rebuild_width` replays on the
meta model at load time (a diffusers config holds one head count and one FFN width for the whole model).

Units, per stream kind (`LAYOUTS`):
- a head: `head_dim` rows of every q/k/v projection (FLUX double / Qwen-Image blocks: the image stream's to_q/k/v
  and the text stream's add_q/k/v_proj, since joint attention concatenates both streams per head) and the same
  `head_dim` input columns of every output projection (to_out.0 and to_add_out; FLUX single blocks: the first
  heads*head_dim columns of proj_out, whose input is [attention | MLP]). qk-norm (RMSNorm over head_dim) and RoPE
  act within a head, so heads go whole and the norms keep their shape;
- an FFN neuron: one output row of the up-projection (ff.net.0.proj, ff_context.net.0.proj, proj_mlp,
  img_mlp / txt_mlp.net.0.proj) and the matching input column of the down-projection (ff.net.2 ...; FLUX single
  blocks: proj_out's columns after the attention part).

Which units form torch-pruning groups (for importance estimation) is `width_groups`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

try:
    import torch_pruning as tp
except ImportError as e:   # a declared dependency (pyproject); say how to get it
    raise ImportError(f"width pruning needs torch-pruning ({e}); pip install 'torch-pruning>=1.5'") from e

OUT, IN = tp.prune_linear_out_channels, tp.prune_linear_in_channels


@dataclass(frozen=True)
class FFNLayout:
    key: str            # the manifest / report name of this FFN ("ff", "ff_context", "mlp", "img_mlp", "txt_mlp")
    up: str             # linear whose output rows are the hidden neurons (relative to the block)
    down: str           # linear whose input columns read them
    text: bool = False  # the text stream's FFN (`text_stream: false` leaves it whole)
    after_heads: bool = False   # down's input is [attention output | neurons] (FLUX single proj_out)


@dataclass(frozen=True)
class WidthLayout:
    attn: str                       # the attention module (heads, inner_dim live there)
    qkv: tuple[str, ...]            # linears whose output rows are head-major (heads x head_dim)
    out: tuple[str, ...]            # linears whose input columns are head-major (the attention output first)
    ffns: tuple[FFNLayout, ...]
    single_mlp: bool = False        # FLUX single block: mlp_hidden_dim and proj_out's packed-row blocks follow

    def ffn(self, key: str) -> FFNLayout:
        return next(f for f in self.ffns if f.key == key)


_QKV2 = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
LAYOUTS: dict[tuple[str, str], WidthLayout] = {
    ("flux", "double"): WidthLayout("attn", _QKV2, ("attn.to_out.0", "attn.to_add_out"),
                                    (FFNLayout("ff", "ff.net.0.proj", "ff.net.2"),
                                     FFNLayout("ff_context", "ff_context.net.0.proj", "ff_context.net.2", text=True))),
    ("flux", "single"): WidthLayout("attn", ("attn.to_q", "attn.to_k", "attn.to_v"), ("proj_out",),
                                    (FFNLayout("mlp", "proj_mlp", "proj_out", after_heads=True),), single_mlp=True),
    ("qwenimage", "double"): WidthLayout("attn", _QKV2, ("attn.to_out.0", "attn.to_add_out"),
                                         (FFNLayout("img_mlp", "img_mlp.net.0.proj", "img_mlp.net.2"),
                                          FFNLayout("txt_mlp", "txt_mlp.net.0.proj", "txt_mlp.net.2", text=True))),
}


def layout_for(adapter, stream: str) -> WidthLayout:
    try:
        return LAYOUTS[(adapter.name, stream)]
    except KeyError:
        raise ValueError(f"width pruning knows no layout for {adapter.name} {stream}-stream blocks "
                         f"(known: {sorted(LAYOUTS)})") from None


@dataclass
class BlockKeep:
    """What one block keeps: sorted head indices and, per FFN key, sorted neuron indices (None: all)."""
    heads: list[int] | None = None
    ffn: dict[str, list[int]] = field(default_factory=dict)

    def set(self, kind: str, kept: list[int]) -> None:
        """`kind` is "heads" or an FFN key."""
        if kind == "heads":
            self.heads = kept
        else:
            self.ffn[kind] = kept


@dataclass(frozen=True)
class BlockShape:
    heads: int
    head_dim: int
    ffn: dict                       # key -> hidden width
    head_params: int                # parameters one head holds (rows of q/k/v with biases, columns of the outs)
    neuron_params: dict             # key -> parameters one neuron holds
    params: int                     # all parameters of the block

    def prunable(self, heads: bool, ffns: tuple[str, ...]) -> int:
        return (self.heads * self.head_params if heads else 0) + sum(self.ffn[k] * self.neuron_params[k] for k in ffns)


def _lin(block: nn.Module, name: str) -> nn.Linear:
    try:
        m = block.get_submodule(name)
    except AttributeError:
        parent = name.rpartition(".")[0].split(".")[0]
        kind = type(getattr(block, parent, None)).__name__
        raise ValueError(f"the block has no {name} ({parent} is a {kind}: FFNs replaced by ppcl_width or dense2moe "
                         "have nothing left to width-prune)") from None
    if not isinstance(m, nn.Linear):
        raise ValueError(f"{name} is a {type(m).__name__}, not a plain nn.Linear: width pruning runs before passes "
                         "that rewrite linears (quantization, smoothing, rotation)")
    return m


def block_shape(block: nn.Module, layout: WidthLayout) -> BlockShape:
    attn = block.get_submodule(layout.attn)
    heads = int(attn.heads)
    head_dim = int(attn.inner_dim) // heads
    per_head = 0
    for n in layout.qkv:
        lin = _lin(block, n)
        per_head += head_dim * (lin.in_features + (lin.bias is not None))
    for n in layout.out:
        per_head += head_dim * _lin(block, n).out_features
    ffn, neuron = {}, {}
    for f in layout.ffns:
        up, down = _lin(block, f.up), _lin(block, f.down)
        ffn[f.key] = up.out_features
        neuron[f.key] = up.in_features + (up.bias is not None) + down.out_features
    return BlockShape(heads, head_dim, ffn, per_head, neuron, sum(p.numel() for p in block.parameters()))


# -- the surgery --------------------------------------------------------------------------------------------

def _check_keep(what: str, keep: list[int], n: int) -> list[int]:
    keep = sorted(int(i) for i in keep)
    if not keep:
        raise ValueError(f"{what}: nothing would be kept (at least one head and one neuron of every FFN stay)")
    if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"{what}: keep indices must be distinct and in 0..{n - 1}")
    return keep


def prune_block(block: nn.Module, adapter, stream: str, keep: BlockKeep) -> dict:
    """Remove from `block`, in place, every head and FFN neuron `keep` does not keep. Each linear is pruned once
    (FLUX single proj_out loses its head columns and its neuron columns together) through torch-pruning's
    `prune_linear_out_channels` / `prune_linear_in_channels`. Returns the block's new widths (the manifest's)."""
    layout = layout_for(adapter, stream)
    shape = block_shape(block, layout)
    hd = shape.head_dim
    heads = _check_keep("heads", keep.heads, shape.heads) if keep.heads is not None else list(range(shape.heads))
    gone_heads = sorted(set(range(shape.heads)) - set(heads))
    head_chans = [h * hd + j for h in gone_heads for j in range(hd)]
    remove: dict[tuple[str, object], list[int]] = {}
    for n in layout.qkv:
        remove.setdefault((n, OUT), []).extend(head_chans)
    for n in layout.out:
        remove.setdefault((n, IN), []).extend(head_chans)
    widths = {}
    for f in layout.ffns:
        n_f = shape.ffn[f.key]
        kept = _check_keep(f"{f.key} neurons", keep.ffn[f.key], n_f) if keep.ffn.get(f.key) is not None \
            else list(range(n_f))
        gone = sorted(set(range(n_f)) - set(kept))
        offset = shape.heads * hd if f.after_heads else 0
        remove.setdefault((f.up, OUT), []).extend(gone)
        remove.setdefault((f.down, IN), []).extend(offset + i for i in gone)
        widths[f.key] = len(kept)
    for (name, fn), idxs in remove.items():
        if idxs:
            lin = _lin(block, name)
            grads = {p: t.requires_grad for p, t in lin.named_parameters()}
            fn(lin, sorted(set(idxs)))
            for p, t in lin.named_parameters():        # torch-pruning makes fresh Parameters (requires_grad=True)
                t.requires_grad_(grads[p])
    attn = block.get_submodule(layout.attn)
    attn.heads = len(heads)
    attn.inner_dim = len(heads) * hd
    if hasattr(attn, "inner_kv_dim"):
        attn.inner_kv_dim = attn.inner_dim
    if hasattr(block, "num_attention_heads"):       # Qwen-Image blocks keep their head count
        block.num_attention_heads = len(heads)
    if layout.single_mlp:
        f = layout.ffns[0]
        block.mlp_hidden_dim = widths[f.key]
        down = _lin(block, f.down)
        if hasattr(down, "_tp_packed_row_blocks"):   # diffusers' tensor-parallel plan: [attention | MLP] columns
            down._tp_packed_row_blocks = [attn.inner_dim, widths[f.key]]
    return {"heads": len(heads), "head_dim": hd, "ffn": widths}


def width_entry(name: str, widths: dict) -> dict:
    """The manifest entry of one width-pruned block."""
    return {"op": "width", "module": name, "heads": widths["heads"], "head_dim": widths["head_dim"],
            "ffn": dict(widths["ffn"])}


def prune_width(model: nn.Module, adapter, keep: dict[str, BlockKeep]) -> list[dict]:
    """Prune every block named in `keep` (block name -> BlockKeep); returns their manifest entries, in model order.
    Record them (`state.record(entry)`) so the artifact rebuilds the narrower blocks at load time."""
    refs = {r.name: r for r in adapter.blocks(model)}
    unknown = sorted(set(keep) - set(refs))
    if unknown:
        raise ValueError(f"no such blocks: {unknown[:4]} (blocks are named like {next(iter(refs))})")
    entries = []
    for name, ref in refs.items():
        if name in keep:
            widths = prune_block(model.get_submodule(name), adapter, ref.stream, keep[name])
            entries.append(width_entry(name, widths))
    return entries


def rebuild_width(model: nn.Module, entry: dict, device=None) -> None:
    """Manifest op `width`: make block `entry["module"]` as narrow as the entry says (on the meta model at load
    time, before weights are read): the same surgery, keeping the first units (the weights then fill them)."""
    from ..arch import adapter_for
    adapter = adapter_for(model)
    name = entry["module"]
    ref = next((r for r in adapter.blocks(model) if r.name == name), None)
    if ref is None:
        raise ValueError(f"{name} is not a block of this model")
    block = model.get_submodule(name)
    layout = layout_for(adapter, ref.stream)
    shape = block_shape(block, layout)
    if int(entry["head_dim"]) != shape.head_dim:
        raise ValueError(f"{name}: the manifest's head_dim {entry['head_dim']} is not the model's {shape.head_dim}")
    ffn = dict(entry.get("ffn") or {})
    if set(ffn) - set(shape.ffn):
        raise ValueError(f"{name}: the manifest names FFNs {sorted(set(ffn) - set(shape.ffn))}, the block has "
                         f"{sorted(shape.ffn)}")
    for what, k, n in [("heads", int(entry["heads"]), shape.heads)] + [(key, int(v), shape.ffn[key])
                                                                       for key, v in ffn.items()]:
        if not 0 < k <= n:
            raise ValueError(f"{name}: the manifest keeps {k} {what}, the block has {n}")
    prune_block(block, adapter, ref.stream, BlockKeep(list(range(int(entry["heads"]))),
                                                      {k: list(range(int(v))) for k, v in ffn.items()}))


def select_blocks(refs, include, keep) -> list:
    """Block refs whose names match `include` (fnmatch, full names) and no pattern of `keep`."""
    return [r for r in refs if any(fnmatchcase(r.name, p) for p in include)
            and not any(fnmatchcase(r.name, p) for p in keep)]
