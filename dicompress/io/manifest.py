"""The manifest: an ordered, versioned record of structural changes, replayable on a meta model.

Each entry is a JSON dict with at least `op` and `module`. A loader builds the original model from
its diffusers config (on the meta device), then `replay` applies every entry in order so the module
tree matches the stored tensors before any weight is read. Each op registers a `rebuild` function
here; passes that add new structure (pruned blocks, MoE FFNs ...) register their own op.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterable

from torch import nn

from ..errors import ArtifactError
from ..nn.act import ActTransform, TransformedLinear
from ..nn.qlinear import QuantLinear
from ..nn.surgery import affine_layernorm, set_module

FORMAT_VERSION = 1  # bump when an existing op changes meaning; new ops alone do not need a bump

RebuildFn = Callable[[nn.Module, dict, object], None]
MANIFEST_OPS: dict[str, RebuildFn] = {}


def dicompress_version() -> str:
    try:
        return version("dicompress")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def register_manifest_op(name: str) -> Callable[[RebuildFn], RebuildFn]:
    """Decorator: `rebuild(model, entry, device)` makes `model` match `entry` (in place)."""
    def deco(fn: RebuildFn) -> RebuildFn:
        MANIFEST_OPS[name] = fn
        return fn
    return deco


def replay(model: nn.Module, manifest: Iterable[dict], device="meta", *, written_by: str | None = None) -> nn.Module:
    """Apply every manifest entry to `model` in order; returns `model`.

    `written_by` (the dicompress version that wrote the artifact) only improves the error for ops
    this version does not know.
    """
    for i, entry in enumerate(manifest):
        op = entry.get("op") if isinstance(entry, dict) else None
        if op not in MANIFEST_OPS:
            need = f"dicompress>={written_by}" if written_by else "a newer dicompress"
            raise ArtifactError(
                f"manifest entry {i} uses op {op!r}, which dicompress {dicompress_version()} does not know "
                f"(known: {', '.join(sorted(MANIFEST_OPS))})",
                hint=f"the artifact needs {need}; upgrade with `pip install -U '{need}'`")
        try:
            MANIFEST_OPS[op](model, entry, device)
        except ArtifactError:
            raise
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest entry {i} ({op} {entry.get('module')!r}) cannot be applied to "
                                f"{type(model).__name__}: {e}",
                                hint="config.json's manifest does not fit this model; re-run the compression "
                                     "that wrote the artifact") from e
    return model


@register_manifest_op("quantize")
def _rebuild_quantize(model: nn.Module, entry: dict, device) -> None:
    name = entry["module"]
    old = model.get_submodule(name)  # AttributeError names the missing module
    # A manifest pointing at a linear of another shape was edited or belongs to another model.
    _check_linear_shape(name, old, entry)
    try:
        new = QuantLinear.from_manifest(entry, device=device)
    except KeyError as e:  # unknown codec: get_codec raises KeyError with the known names
        raise ArtifactError(f"{name}: {e.args[0]}",
                            hint="the artifact uses a codec this dicompress does not have; upgrade dicompress") from e
    set_module(model, name, new)


def _check_linear_shape(name: str, module: nn.Module, entry: dict) -> None:
    shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    if shape != (entry["in_features"], entry["out_features"]):
        raise ValueError(f"{name} is {type(module).__name__} with (in, out) = {shape}, the manifest says "
                         f"({entry['in_features']}, {entry['out_features']})")


@register_manifest_op("act")
def _rebuild_act(model: nn.Module, entry: dict, device) -> None:
    """Give a linear its input transform: a plain nn.Linear becomes a TransformedLinear; a linear that
    already carries one (TransformedLinear, QuantLinear) has it replaced by the entry's."""
    name = entry["module"]
    old = model.get_submodule(name)
    _check_linear_shape(name, old, entry)
    act = ActTransform.from_spec(entry["act"], entry["in_features"], device=device)
    if type(old) is nn.Linear:
        set_module(model, name, TransformedLinear(old.in_features, old.out_features, old.bias is not None, act=act,
                                                  device=device, dtype=old.weight.dtype))
    elif isinstance(old, (TransformedLinear, QuantLinear)):
        old.act = act
    else:
        raise ValueError(f"{name} is a {type(old).__name__}, which cannot carry an input transform")


@register_manifest_op("affine_norm")
def _rebuild_affine_norm(model: nn.Module, entry: dict, device) -> None:
    """A LayerNorm without affine weight gains one (smoothing folded into it)."""
    name = entry["module"]
    old = model.get_submodule(name)
    if list(getattr(old, "normalized_shape", ())) != list(entry["normalized_shape"]):
        raise ValueError(f"{name} is {type(old).__name__} of shape {getattr(old, 'normalized_shape', None)}, "
                         f"the manifest says {entry['normalized_shape']}")
    set_module(model, name, affine_layernorm(old, device=device))


# Depth changes: the saved config's block counts already describe the pruned model, which diffusers builds
# unaided; these entries record what was done (and let `plug` undo PPCL intervals), and check the module.
@register_manifest_op("ppcl_interval")
@register_manifest_op("hybrid_stream")
def _check_block(model: nn.Module, entry: dict, device) -> None:
    model.get_submodule(entry["module"])   # AttributeError: the config's depth disagrees with the manifest


# ops whose `module` names a module of the *original* model (not present in the loaded one)
ORIGINAL_MODEL_OPS = frozenset({"remove_block"})
# ops of restructured (not rewritten) models: an artifact holding only these can be a recipe's model
STRUCTURAL_OPS = frozenset({"ppcl_interval", "hybrid_stream", "remove_block", "width", "ppcl_width", "moe_ffn",
                            "mob_gate", "clear_attention"})


@register_manifest_op("remove_block")
def _record_only(model: nn.Module, entry: dict, device) -> None:
    """Names a block of the *original* model; nothing to rebuild."""


@register_manifest_op("width")
def _rebuild_width(model: nn.Module, entry: dict, device) -> None:
    """A width-pruned block: as many heads and FFN neurons as the entry keeps (prune/width.py)."""
    from ..prune.width import rebuild_width   # lazy: torch-pruning is imported only for width artifacts
    rebuild_width(model, entry, device)


@register_manifest_op("ppcl_width")
def _rebuild_ppcl_width(model: nn.Module, entry: dict, device) -> None:
    """An FFN replaced by a residual projector x + Linear(x) (passes/ppcl_width.py); the entry describes the FFN
    it replaced (dim, hidden, activation_fn, bias), which must be what the model has there. `ffn: mlp`: a FLUX
    single block's MLP, folded into the block's proj_mlp / proj_out (`module` is the block)."""
    from ..prune.projector import ResidualProjector, ffn_spec, rebuild_single_projector
    name = entry["module"]
    old = model.get_submodule(name)
    if entry.get("ffn") == "mlp":
        rebuild_single_projector(old, entry, device)
        return
    spec = ffn_spec(old)        # ValueError: not the FFN the manifest says was replaced
    if spec["dim"] != entry["dim"] or spec["hidden"] != entry["hidden"]:
        raise ValueError(f"{name} is an FFN of width {spec['dim']} (hidden {spec['hidden']}), the manifest says "
                         f"{entry['dim']} (hidden {entry['hidden']})")
    set_module(model, name, ResidualProjector(int(entry["dim"]), device=device, dtype=old.net[2].weight.dtype))



@register_manifest_op("moe_ffn")
def _rebuild_moe_ffn(model: nn.Module, entry: dict, device) -> None:
    """A Dense2MoE FFN: the dense FeedForward becomes an empty MoEFFN of the entry's shape (moe/manifest_op.py)."""
    from ..moe.manifest_op import rebuild_moe_ffn   # lazy: moe imports io (no import cycle at module level)
    rebuild_moe_ffn(model, entry, device)


@register_manifest_op("mob_gate")
def _rebuild_mob_gate(model: nn.Module, entry: dict, device) -> None:
    """A Mixture-of-Blocks block: gated by a router on its temb (moe/mob_op.py); its own keys are unchanged."""
    from ..moe.mob_op import rebuild_mob_gate   # lazy, as moe_ffn
    rebuild_mob_gate(model, entry, device)


@register_manifest_op("fold_scale")
def _rebuild_fold_scale(model: nn.Module, entry: dict, device) -> None:
    """Smoothing folded into a norm or a producer's rows, recorded on the block for LoRA (lora/folds.py)."""
    from ..lora.folds import rebuild_fold_scale
    rebuild_fold_scale(model, entry, device)


@register_manifest_op("clear_attention")
def _rebuild_clear_attention(model: nn.Module, entry: dict, device) -> None:
    """CLEAR attention: the module's processor becomes the local-window one (clear/manifest_op.py)."""
    from ..clear.manifest_op import rebuild_clear_attention   # lazy, as moe_ffn
    rebuild_clear_attention(model, entry, device)
