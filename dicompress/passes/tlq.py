"""`tlq` pass: weight-only twin-log quantization (LRQ-DiT) of the selected linears."""
from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..quant.tlq import DEFAULT_ETAS, DEFAULT_PERCENTILES, TLQ_CODEC, tlq_column_quantizer, tlq_quantize
from ..quant.tlq_output import OUTPUT_ETAS, tlq_output_quantize
from ._weight_quant import WeightQuantConfig, WeightQuantPass, quantize_linears
from .base import register_pass


class TLQConfig(WeightQuantConfig):
    etas: tuple[float, ...] | None = Field(None, description="twin-log grid shapes searched per layer by weight "
                                                             "MSE; null = quant/tlq.py DEFAULT_ETAS")
    percentiles: tuple[float, ...] | None = Field(None, description="top-of-grid clip percentiles searched per layer; "
                                                                    "null = quant/tlq.py DEFAULT_PERCENTILES")

    grid_search: Literal["weight", "output"] = Field(
        "weight", description="how eta and the clip / bottom quantiles are chosen: `weight` = weight MSE under "
                              "nearest rounding; `output` = the layer's output error tr(ΔW H ΔWᵀ) after GPTQ on "
                              "each candidate grid (per layer eta, per row quantiles; adds near-uniform etas 1, "
                              "2, 4 to the default etas); needs gptq: true")

    @model_validator(mode="after")
    def _output_search_needs_gptq(self):
        if self.grid_search == "output" and not self.gptq:
            raise ValueError("grid_search: output scores grids by the output error after GPTQ; set gptq: true")
        return self

    @field_validator("etas")
    @classmethod
    def _etas(cls, v):
        if v is not None and (not v or min(v) < 0):
            raise ValueError("etas must be a non-empty list of values >= 0")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v):
        if v is not None and (not v or not all(0 < p <= 1 for p in v)):
            raise ValueError("percentiles must be a non-empty list of values in (0, 1]")
        return v


@register_pass
class TLQ(WeightQuantPass):
    name = "tlq"
    Config = TLQConfig

    def quantize(self, state) -> None:
        c = self.config
        quantize = partial(tlq_quantize, etas=c.etas or DEFAULT_ETAS,
                           percentiles=c.percentiles or DEFAULT_PERCENTILES)
        if c.grid_search == "output":
            quantize = _output_search(quantize, etas=c.etas or OUTPUT_ETAS,
                                      percentiles=c.percentiles or DEFAULT_PERCENTILES,
                                      damp=c.gptq_damp, act_order=c.gptq_act_order)
        quantize_linears(state, self.name, c, codec=TLQ_CODEC.name, quantize=quantize,
                         column_quantizer=tlq_column_quantizer)



def _output_search(by_weight, **kw):
    """A quantizer that scores grids on the layer's Hessian when quantize_linears passes one (layers inside
    a block), else the weight-MSE search."""
    def quantize(w, bits, group_size, hessian=None):
        if hessian is None:
            return by_weight(w, bits, group_size)
        return tlq_output_quantize(w, bits, group_size, hessian, **kw)
    quantize.uses_hessian = True
    return quantize
