"""`rtn` pass: weight-only uniform round-to-nearest (asymmetric min-max), the baseline TLQ is held against."""
from __future__ import annotations

from ..quant.uniform import UNIFORM_CODEC, rtn_column_quantizer, rtn_quantize
from ._weight_quant import WeightQuantConfig, WeightQuantPass, quantize_linears
from .base import register_pass


class RTNConfig(WeightQuantConfig):
    pass


@register_pass
class RTN(WeightQuantPass):
    name = "rtn"
    Config = RTNConfig

    def quantize(self, state) -> None:
        quantize_linears(state, self.name, self.config, codec=UNIFORM_CODEC.name, quantize=rtn_quantize,
                         column_quantizer=rtn_column_quantizer)
