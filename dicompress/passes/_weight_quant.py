"""What the weight-only quantization passes (tlq, rtn) share: the config keys and the layer loop."""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from ..nn.qlinear import QuantLinear
from ..nn.surgery import set_module
from .base import Pass, PassConfig, select_layers

GROUP_SIZES = (64, 128)   # what the packed kernels are written for

# (w fp32 [out, in], bits, group_size | None) -> (codes, buffers, info with eta/percentile/sqnr_db)
Quantizer = Callable[[torch.Tensor, int, "int | None"], tuple[torch.Tensor, dict, dict]]


class WeightQuantConfig(PassConfig):
    bits: int = Field(ge=2, le=8, description="bits per weight")
    granularity: Literal["channel", "group"] = "channel"
    group_size: int = Field(128, description="weights per scale along in_features; only with granularity: group")
    include: tuple[str, ...] | None = Field(None, description="fnmatch patterns of linears to quantize; "
                                                               "null = the architecture's default")
    keep: tuple[str, ...] | None = Field(None, description="fnmatch patterns never quantized; null = the "
                                                            "architecture's default")

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {v}")
        return v

    @model_validator(mode="after")
    def _group_size_needs_group(self):
        if "group_size" in self.model_fields_set and self.granularity != "group":
            raise ValueError("group_size applies only to granularity: group; set granularity: group or "
                             "remove group_size")
        return self

    @property
    def effective_group_size(self) -> int | None:
        return self.group_size if self.granularity == "group" else None


def quantize_linears(state, pass_name: str, config: WeightQuantConfig, codec: str, quantize: Quantizer) -> None:
    """Replace every selected nn.Linear by a QuantLinear (codec `codec`), record it in the manifest and
    add the pass's report (one row per layer)."""
    targets = select_layers(state, pass_name, config.include, config.keep)
    gs, rows = config.effective_group_size, []
    for name, linear in tqdm(targets, desc=pass_name, unit="layer", disable=not state.progress):
        codes, buffers, info = quantize(linear.weight.detach().float(), config.bits, gs)
        # a TransformedLinear's weight is already in its input transform's basis: the transform moves along
        q = QuantLinear.from_linear_codes(linear, codes, buffers, codec, config.bits, gs,
                                          act=getattr(linear, "act", None))
        set_module(state.model, name, q)
        state.record(q.manifest_entry(name))
        rows.append({"module": name, "method": pass_name, "bits": config.bits, "group_size": gs,
                     "eta": info["eta"], "percentile": info["percentile"],
                     "sqnr_db": info["sqnr_db"] if math.isfinite(info["sqnr_db"]) else None,  # None = exact
                     "shape": [q.out_features, q.in_features]})
    sqnr = [r["sqnr_db"] for r in rows if r["sqnr_db"] is not None]
    state.add_pass_report(pass_name, {"layers_quantized": len(rows),
                                      "mean_sqnr_db": sum(sqnr) / len(sqnr) if sqnr else None,
                                      "min_sqnr_db": min(sqnr) if sqnr else None}, rows)


class WeightQuantPass(Pass):
    """Base of weight quantizers: one order rule, since a quantized linear cannot be quantized again."""

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        mine = (self.config.include, self.config.keep)
        for i, p in enumerate(previous):
            if isinstance(p, WeightQuantPass) and (p.config.include, p.config.keep) == mine:
                return [("", f"quantizes the same linears as passes[{i}].{p.name}; give one of them "
                             "disjoint `include` / `keep` patterns, or drop one")]
        return []
