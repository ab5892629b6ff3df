"""Teach peft and diffusers' LoRA loaders about dicompress layers (installed once, idempotent).

What this relies on (tested with peft 0.21.2 and diffusers 0.42.1; tests/test_lora.py):
  - peft `LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)`, a staticmethod trying
    dispatchers in turn: ours is tried first and returns None for layers it does not handle;
  - diffusers `PeftAdapterMixin.load_lora_adapter` / `add_adapter` injecting into the model: before they run,
    each recorded fold is attached to its linear (`_dicompress_folds`) for the dispatcher to read;
  - diffusers `FluxLoraLoaderMixin._maybe_expand_lora_state_dict` reading `transformer.state_dict()[
    '<module>.weight']`, which a QuantLinear does not have (it stores codes): for models holding one, the same
    zero-padding check runs on `in_features` instead;
  - diffusers `PeftAdapterMixin.fuse_lora`: refused before any layer is touched when a dicompress LoRA layer is present
    (otherwise plain layers would merge and the compressed ones then fail, leaving a half-fused model).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import ModelError
from ..nn.qlinear import QuantLinear
from .folds import fold_scales, unrecorded_folds

_INSTALLED = False


def attach_folds(model: nn.Module) -> None:
    """Give every linear with a recorded fold its {"in", "out"} scale vectors (read by the peft dispatcher)."""
    if unrecorded_folds(model):
        raise ModelError("this compressed model folds smoothing into its norms but was written before dicompress "
                         "recorded the fold scales, so a LoRA cannot be given the original input of its linears",
                         hint="run the compression again with this dicompress (the new artifact records them), or "
                              "use a recipe with `smooth: {fold: false}`")
    for name, sides in fold_scales(model).items():
        lin = model.get_submodule(name)
        lin.__dict__["_dicompress_folds"] = dict(sides)   # plain attribute: not a buffer, never saved


def _has_quantlinear(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def _patch_peft() -> None:
    from peft.tuners.lora.model import LoraModel
    from .layer import dispatch_compressed

    original = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_compressed(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__wrapped__ = original
    LoraModel._create_new_module = staticmethod(_create_new_module)


def _patch_diffusers() -> None:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from diffusers.loaders.peft import PeftAdapterMixin
    from .layer import FUSE_REFUSED, CompressedLoraLinear, FuseRefused

    def with_folds(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            attach_folds(self)
            return fn(self, *args, **kwargs)
        return wrapper

    PeftAdapterMixin.load_lora_adapter = with_folds(PeftAdapterMixin.load_lora_adapter)
    PeftAdapterMixin.add_adapter = with_folds(PeftAdapterMixin.add_adapter)

    expand = FluxLoraLoaderMixin._maybe_expand_lora_state_dict.__func__

    @classmethod
    @functools.wraps(expand)
    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        if not _has_quantlinear(transformer):
            return expand(cls, transformer, lora_state_dict)
        return _pad_lora_inputs(transformer, lora_state_dict, f"{cls.transformer_name}.")

    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = _maybe_expand_lora_state_dict

    fuse = PeftAdapterMixin.fuse_lora

    @functools.wraps(fuse)
    def fuse_lora(self, *args, **kwargs):
        layer = next((m for m in self.modules() if isinstance(m, CompressedLoraLinear)), None)
        if layer is not None:
            raise FuseRefused(FUSE_REFUSED.format(name=type(layer.get_base_layer()).__name__))
        return fuse(self, *args, **kwargs)

    PeftAdapterMixin.fuse_lora = fuse_lora


def _pad_lora_inputs(transformer: nn.Module, lora_state_dict: dict, prefix: str) -> dict:
    """diffusers' check, on in_features: a LoRA A narrower than its layer is zero-padded, a wider one refused."""
    for key in [k for k in lora_state_dict if k.startswith(prefix) and k.endswith(".lora_A.weight")]:
        name = key[len(prefix):-len(".lora_A.weight")]
        try:
            mod = transformer.get_submodule(name)
        except AttributeError:
            continue                                  # diffusers ignores unexpected modules too
        mod = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        width, a = getattr(mod, "in_features", None), lora_state_dict[key]
        if width is None or a.shape[1] == width:
            continue
        if a.shape[1] > width:
            raise ModelError(f"the LoRA's {name}.lora_A has {a.shape[1]} input features, the layer {width}",
                             hint="this LoRA expands the layer (a Control LoRA); load it on the uncompressed model")
        padded = torch.zeros(a.shape[0], width, dtype=a.dtype, device=a.device)
        padded[:, :a.shape[1]] = a
        lora_state_dict[key] = padded
    return lora_state_dict


def install() -> None:
    """Patch peft's dispatch and diffusers' LoRA loaders (idempotent; needs peft installed)."""
    global _INSTALLED
    if _INSTALLED:
        return
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ModelError("LoRA on compressed models needs peft", hint="pip install peft") from e
    _patch_peft()
    _patch_diffusers()
    _INSTALLED = True
