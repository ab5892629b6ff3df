"""`tlq` pass: weight-only twin-log quantization (LRQ-DiT) of the selected linears."""
from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ..quant.tlq import DEFAULT_ETAS, DEFAULT_PERCENTILES, TLQ_CODEC, tlq_column_quantizer, tlq_quantize
from ..errors import CalibrationError
from ..quant.tlq_output import OUTPUT_ETAS, tlq_output_quantize
from ._bit_budget import (BitBudget, budget_field, budget_problem, budget_shapes, check_budget, choose_bits,
                          measure_errors)
from ._weight_quant import BlockHessians, WeightQuantConfig, WeightQuantPass, check_lowrank, quantize_linears
from .base import register_pass, select_layers


class TLQConfig(WeightQuantConfig):
    bits: Annotated[int, Field(ge=2, le=8)] | Literal["auto"] = Field(
        description="bits per weight, or `auto`: a width per layer from `budget` (needs calibration with block "
                    "inputs: each layer's output error is measured at every candidate width)")
    budget: BitBudget | None = Field(None, description="with bits: auto, the packed bytes to meet: "
                                                       "{bytes_fraction: F} or {avg_bits: B}")
    etas: tuple[float, ...] | None = Field(None, description="twin-log grid shapes searched per layer by weight "
                                                             "MSE; null = quant/tlq.py DEFAULT_ETAS")
    percentiles: tuple[float, ...] | None = Field(None, description="top-of-grid clip percentiles searched per layer; "
                                                                    "null = quant/tlq.py DEFAULT_PERCENTILES")

    grid_search: Literal["weight", "output"] = Field(
        "weight", description="how eta and the clip / bottom quantiles are chosen: `weight` = weight MSE under "
                              "nearest rounding; `output` = the layer's output error tr(ΔW H ΔWᵀ) after GPTQ on "
                              "each candidate grid (per layer eta, per row quantiles; adds near-uniform etas 1, "
                              "2, 4 to the default etas); needs gptq: true. With bits: auto the widths are chosen "
                              "from errors measured with GPTQ on the weight-MSE grids (the report's "
                              "budget_output_error / total_error), then this search refines each layer's grid at "
                              "its width: same bytes, and each layer's final output_sqnr_db is the refined grid's, "
                              "usually above the measured one, but the widths were allocated on the measured "
                              "errors, not on the refined ones")

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_or_auto(cls, v):
        """One message for a bad width (the union would report one error per member)."""
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
            raise ValueError(f"bits must be an integer 2..8, or 'auto' (a width per layer from `budget`); got {v!r}")
        return v

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

    @model_validator(mode="after")
    def _budget_with_auto(self):
        if (self.bits == "auto") != (self.budget is not None):
            raise ValueError("bits: auto needs a `budget` ({bytes_fraction: F} or {avg_bits: B}), and a budget "
                             "needs bits: auto")
        return self


@register_pass
class TLQ(WeightQuantPass):
    name = "tlq"
    Config = TLQConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        if self.config.bits == "auto":   # a global choice over every layer: measured on block inputs, never streamed
            self.needs_calibration = self.needs_block_inputs = True
            self.streamable = False

    def checks_model(self) -> bool:
        return self.config.bits == "auto"        # only a budget depends on the model's layers

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        c = self.config
        if c.bits != "auto":
            return []
        shapes = budget_shapes(model, adapter, c.include, c.keep)
        if not shapes:
            return []       # select_layers names the empty selection when the pass runs
        problem = budget_problem(c.budget, shapes, TLQ_CODEC.name, c.effective_group_size, c.lowrank_rank)
        return [(budget_field(c.budget), problem)] if problem else []

    def apply(self, state) -> None:
        if self.config.bits == "auto" and not self.calibration(state).has_block_inputs:
            raise CalibrationError("tlq with bits: auto measures each layer's output error on the calibration's "
                                   "block inputs, but this store holds statistics only",
                                   hint="set `calibration.block_inputs: auto` (or true) and capture again")
        super().apply(state)

    def quantize(self, state) -> None:
        c = self.config
        quantize = partial(tlq_quantize, etas=c.etas or DEFAULT_ETAS,
                           percentiles=c.percentiles or DEFAULT_PERCENTILES)
        bits_of = extra = summary = None
        if c.bits == "auto":     # widths measured on the weight-MSE grids; grid_search: output then refines each
            bits_of, extra, summary = self.allocate(state, quantize)
        if c.grid_search == "output":
            quantize = _output_search(quantize, etas=c.etas or OUTPUT_ETAS,
                                      percentiles=c.percentiles or DEFAULT_PERCENTILES,
                                      damp=c.gptq_damp, act_order=c.gptq_act_order)
        quantize_linears(state, self.name, c, codec=TLQ_CODEC.name, quantize=quantize,
                         column_quantizer=tlq_column_quantizer, bits_of=bits_of, extra=extra, summary=summary)

    def allocate(self, state, quantize) -> tuple[dict, dict, dict]:
        """bits: auto: every layer's output error at every candidate width, then the widths that meet the budget
        with the least total error. Returns ({name: bits}, {name: report fields}, summary fields)."""
        c, gs = self.config, self.config.effective_group_size
        targets = select_layers(state, self.name, c.include, c.keep)
        shapes = [(m.out_features, m.in_features) for _, m in targets]
        check_budget(c.budget, shapes, TLQ_CODEC.name, gs, self.name, c.lowrank_rank)     # before the measuring
        check_lowrank(self.name, c.lowrank_rank, targets)
        names = [n for n, _ in targets]
        with BlockHessians(state, names) as hessians:
            measured = measure_errors(targets, hessians, c, TLQ_CODEC.name, quantize, tlq_column_quantizer)
        bits, _, summary = choose_bits(names, shapes, measured, c.budget, TLQ_CODEC.name, gs, c.lowrank_rank)
        extra = {n: {"budget_output_energy": m["signal"],
                     "budget_output_error": {str(b): v for b, v in m["noise"].items()}}
                 for n, m in zip(names, measured)}
        return bits, extra, summary



def _output_search(by_weight, **kw):
    """A quantizer that scores grids on the layer's Hessian when quantize_linears passes one (layers inside
    a block), else the weight-MSE search."""
    def quantize(w, bits, group_size, hessian=None):
        if hessian is None:
            return by_weight(w, bits, group_size)
        return tlq_output_quantize(w, bits, group_size, hessian, **kw)
    quantize.uses_hessian = True
    return quantize
