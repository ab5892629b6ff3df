"""A peft LoRA layer for dicompress linears: the low-rank branch in high precision on the original input.

    y = base(x) + Σ_adapters  scaling · B·A·(x ⊙ fold_in)  ⊘ fold_out

`base` is the compressed layer as it is (QuantLinear: packed codes, its own smoothing / rotation / activation
quantization online; TransformedLinear; or a float linear a fold scaled). Online transforms live inside `base`,
so the branch already reads the input the original linear read; only smoothing folded upstream changes that
input (x arrives as x_orig / fold_in) and, on a producer, the output (rows come out / fold_out): the two
vectors undo exactly that (lora/folds.py). The branch runs in A's dtype (fp32 unless the adapter was cast).

Merging (fuse_lora) is refused: the weight is stored quantized and/or in a rotated basis, so a fused weight
would have to be quantized again, adding a new quantization error the unfused branch does not have.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..nn.act import TransformedLinear
from ..nn.qlinear import QuantLinear

FUSE_REFUSED = ("fuse_lora() / merge is not supported on a dicompress-compressed layer ({name}): its weight is "
                "stored as quantized codes and/or in a smoothed and rotated basis, so fusing would re-quantize it "
                "and add a new error. The LoRA already runs unfused as an exact high-precision branch; to bake a "
                "LoRA in, fuse it on the uncompressed model and run the compression again (`dicompress run`).")


class FuseRefused(NotImplementedError):
    pass


class CompressedLoraLinear(nn.Module, LoraLayer):
    """LoRA around a QuantLinear / TransformedLinear / folded linear (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 folds: dict[str, torch.Tensor] | None = None, **kwargs: Any):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora or getattr(config, "velora_config", None) is not None:
            raise ValueError(f"{type(self).__name__} supports plain LoRA only (no DoRA / VeLoRA)")
        base = self.get_base_layer()
        folds = folds or {}
        dev = _device_of(base)
        for side in ("in", "out"):
            s = folds.get(side)
            # non-persistent: the adapter's state dict stays peft's own; the values live on the block
            self.register_buffer(f"fold_{side}", None if s is None else s.detach().to(dev, torch.float32).clone(),
                                 persistent=False)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        return None

    # -- merging is refused (never a silent no-op) ------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise FuseRefused(FUSE_REFUSED.format(name=type(self.get_base_layer()).__name__))

    def unmerge(self) -> None:
        return None          # nothing was ever merged

    def get_delta_weight(self, adapter) -> torch.Tensor:
        raise FuseRefused(FUSE_REFUSED.format(name=type(self.get_base_layer()).__name__))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return result
        out_dtype = result.dtype
        delta = None
        for name in active:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_A.weight.dtype)    # cast first: the fold applies in A's precision
            if self.fold_in is not None:
                h = h * self.fold_in.to(h.dtype)
            d = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            delta = d if delta is None else delta + d
        if self.fold_out is not None:
            delta = delta / self.fold_out.to(delta.dtype)
        return (result + delta).to(out_dtype)

    def __repr__(self) -> str:
        return "dicompress.lora." + super().__repr__()


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def handles(base: nn.Module) -> bool:
    """Layers this class must wrap: quantized, input-transformed, or carrying a recorded fold."""
    return isinstance(base, (QuantLinear, TransformedLinear)) or getattr(base, "_dicompress_folds", None) is not None


def dispatch_compressed(target: nn.Module, adapter_name: str, config, **kwargs: Any) -> Optional[nn.Module]:
    """peft dispatcher (first match wins; this one runs before peft's own)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not handles(base):
        return None
    if kwargs.get("parameter_name") is not None:
        raise ValueError(f"LoRA on a parameter of {type(base).__name__} is not supported; target the module")
    kwargs.pop("parameter_name", None)
    return CompressedLoraLinear(target, adapter_name, config=config,
                                folds=getattr(base, "_dicompress_folds", None), **kwargs)
