"""`tlq` pass: weight-only twin-log quantization (LRQ-DiT) of the selected linears."""
from __future__ import annotations

from functools import partial

from pydantic import Field, field_validator

from ..quant.tlq import DEFAULT_ETAS, DEFAULT_PERCENTILES, TLQ_CODEC, tlq_column_quantizer, tlq_quantize
from ._weight_quant import WeightQuantConfig, WeightQuantPass, quantize_linears
from .base import register_pass


class TLQConfig(WeightQuantConfig):
    etas: tuple[float, ...] | None = Field(None, description="twin-log grid shapes searched per layer by weight "
                                                             "MSE; null = quant/tlq.py DEFAULT_ETAS")
    percentiles: tuple[float, ...] | None = Field(None, description="top-of-grid clip percentiles searched per layer; "
                                                                    "null = quant/tlq.py DEFAULT_PERCENTILES")

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
        quantize_linears(state, self.name, c, codec=TLQ_CODEC.name, quantize=quantize,
                         column_quantizer=tlq_column_quantizer)

