"""What passes need to know about a model family, so they never name diffusers classes themselves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ModelError

ARCHS: dict[str, "ArchAdapter"] = {}


@dataclass(frozen=True)
class BlockRef:
    name: str          # dotted module name, e.g. "transformer_blocks.3"
    stream: str        # "double" (two streams, joint attention), "single" (one concatenated stream)
    index: int         # position within its stream's ModuleList


@dataclass(frozen=True)
class NormFold:
    """The group's input is (norm(h)·γ + β)·(1 + scale) + shift (AdaLN), `shift` being chunk `shift` of the
    `chunks` equal pieces of `linear`'s output: a per-channel 1/s folds exactly into γ, β and the shift rows
    (a norm without affine weight gets one). Names are relative to the block."""
    norm: str
    linear: str
    chunks: int
    shift: int


@dataclass(frozen=True)
class RowsFold:
    """The group's input mixes the outputs of `linears` channel by channel (attention: softmax(QKᵀ)·V mixes
    tokens, never channels, so V's channels pass through): 1/s folds exactly into their output rows."""
    linears: tuple[str, ...]


@dataclass(frozen=True)
class InputGroup:
    """Linears of a block whose inputs are scaled together: they read one tensor (to_q/to_k/to_v), or
    their inputs come out of one fold site (to_out.0 / to_add_out: both halves of one attention output).
    They share one smoothing vector s. `fold`: where 1/s is absorbed exactly; None keeps s online."""
    linears: tuple[str, ...]
    fold: NormFold | RowsFold | None = None


class ArchAdapter:
    """One subclass per model family. Instances are stateless; pass the model to each method."""

    name: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]       # diffusers class names handled
    block_lists: ClassVar[tuple[tuple[str, str], ...]]   # (ModuleList attribute, stream kind) in run order
    quant_include: ClassVar[tuple[str, ...]]       # linears quantized by default (fnmatch, full names)
    quant_keep: ClassVar[tuple[str, ...]]          # kept in high precision by default
    attention_linears: ClassVar[tuple[str, ...]]   # names relative to a block
    ffn_linears: ClassVar[tuple[str, ...]]
    # block forward kwargs that carry one row per sample (captured per sample); the rest are shared
    per_sample_inputs: ClassVar[tuple[str, ...]]
    shared_inputs: ClassVar[tuple[str, ...]]
    # model forward kwargs without a batch dimension (e.g. FLUX's img_ids / txt_ids), for model-input capture
    model_shared_inputs: ClassVar[tuple[str, ...]] = ()
    # stream kind -> the block's InputGroups (data for `smooth` and `ars`); linears in no group are
    # smoothed online, on their own
    input_groups: ClassVar[dict[str, tuple[InputGroup, ...]]] = {}
    # ModuleList attribute -> the config key holding its length (depth pruning rewrites both)
    block_count_keys: ClassVar[dict[str, str]] = {}

    def blocks(self, model: nn.Module) -> list[BlockRef]:
        refs = []
        for attr, stream in self.block_lists:
            for i, _ in enumerate(getattr(model, attr)):
                refs.append(BlockRef(f"{attr}.{i}", stream, i))
        return refs

    def run_block(self, block: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
        """Run one block on captured inputs (as returned by the calibration store); returns the
        block's outputs under the input names they replace (e.g. hidden_states, encoder_hidden_states)."""
        raise NotImplementedError

    def output_head(self, model: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The model's output layers after the last block (image stream -> prediction); `temb` as the
        last block received it (its captured input). Depth analysis compares predictions through this."""
        raise NotImplementedError

    def single_from_double(self, model: nn.Module, block: nn.Module) -> nn.Module:
        """A single-stream block initialised from a dual-stream block's image branch (hybrid-stream
        conversion); families without a single-stream block class cannot."""
        raise NotImplementedError(f"{self.name} has no single-stream block to convert dual-stream blocks into")

    def synthetic_inputs(self, model: nn.Module, batch: int, generator: torch.Generator,
                         grid: tuple[int, int] = (8, 8)) -> dict:
        """Random model-forward kwargs of the right shapes (plumbing-grade calibration), on an h x w image token
        grid."""
        raise NotImplementedError

    def describe(self, model: nn.Module) -> dict:
        cfg = dict(model.config) if hasattr(model, "config") else {}
        streams: dict[str, int] = {}
        for b in self.blocks(model):
            streams[b.stream] = streams.get(b.stream, 0) + 1
        return {"arch": self.name, "class": type(model).__name__, "blocks": streams,
                "params": sum(p.numel() for p in model.parameters()),
                "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}


def register_arch(adapter_cls: type[ArchAdapter]) -> type[ArchAdapter]:
    ARCHS[adapter_cls.name] = adapter_cls()
    return adapter_cls


def supported_classes() -> list[str]:
    _load_builtin()
    return sorted(c for a in ARCHS.values() for c in a.model_classes)


def adapter_for_class(class_name: str) -> ArchAdapter | None:
    _load_builtin()
    for a in ARCHS.values():
        if class_name in a.model_classes:
            return a
    return None


def adapter_for(model: nn.Module) -> ArchAdapter:
    a = adapter_for_class(type(model).__name__)
    if a is None:
        raise ModelError(f"unsupported architecture {type(model).__name__}",
                         hint=f"supported model classes: {', '.join(supported_classes())}")
    return a


def _load_builtin() -> None:
    # function level: flux.py and qwenimage.py import this module (register_arch); loaded at the first lookup
    from . import flux, qwenimage  # noqa: F401  (register on import)
