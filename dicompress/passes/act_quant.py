"""`act_quant` pass: dynamic per-token activation quantization of the selected linears' inputs.

Sets `act_bits` on each selected linear's input transform (after its smoothing and rotation, if any), giving
an identity transform to linears that have none, and the grid: symmetric absmax, or asymmetric with an integer
zero point per token (`zero_point: true`; quant/activation.py). Left unset, each input keeps the grid an
earlier `lrq_auto` chose for it (symmetric where none did). Only linear inputs are quantized: the attention matmuls
(QKᵀ, AV) stay in high precision, as in LRQ-DiT. Works before or after the weight quantizer.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..nn.act import ActTransform, TransformedLinear, act_entry
from ..nn.qlinear import QuantLinear
from ..nn.surgery import matches, set_module
from .base import Pass, PassConfig, last_named, register_pass, select_layers


class ActQuantConfig(PassConfig):
    bits: int = Field(ge=2, le=16, description="bits per activation (8, 6, 4 in LRQ-DiT)")
    granularity: Literal["token"] = Field("token", description="one dynamic absmax scale per token")
    zero_point: bool | None = Field(None, description="true: asymmetric grid, an integer zero point per token over "
                                                      "[min, max] (helps one-sided inputs, most at 4 bits; the "
                                                      "GEMM stays integer: a rank-1 correction per call); false: "
                                                      "symmetric absmax; null: what lrq_auto chose per input, "
                                                      "else symmetric")
    include: tuple[str, ...] | None = Field(None, description="fnmatch patterns of linears whose inputs are "
                                                               "quantized; null = the architecture's quantized linears")
    keep: tuple[str, ...] | None = Field(None, description="fnmatch patterns kept in high precision; null = the "
                                                            "architecture's default (AdaLN, embedders, proj_out)")


def act_targets(model: nn.Module, include, keep) -> list[tuple[str, nn.Module]]:
    """Linears of any kind (float, transformed, weight-quantized) matching include and not keep."""
    kinds = (nn.Linear, TransformedLinear, QuantLinear)
    return [(n, m) for n, m in model.named_modules()
            if type(m) in kinds and matches(n, include) and not matches(n, keep)]


@register_pass
class ActQuant(Pass):
    name = "act_quant"
    Config = ActQuantConfig
    streamable = True

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        for i, p in enumerate(previous):
            if p.name == self.name:
                return [("", f"activations are already quantized by passes[{i}].act_quant; keep one "
                             "`act_quant` (it sets the bits of every selected input)")]
        hit = last_named(previous, "lrq_auto")     # its transforms were chosen for a_bits-bit activations
        if hit is not None and self.config.zero_point is not None and hit[1].config.zero_points != (False,):
            return [("zero_point", f"{str(self.config.zero_point).lower()} would overwrite the activation grid "
                                   f"passes[{hit[0]}].lrq_auto chose per input (zero_points: "
                                   f"{[str(z).lower() for z in hit[1].config.zero_points]}); leave "
                                   "act_quant.zero_point unset")]
        if hit is not None and hit[1].config.a_bits != self.config.bits:
            i, bits, theirs = hit[0], self.config.bits, hit[1].config.a_bits
            if theirs is None:
                return [("bits", f"{bits}, but passes[{i}].lrq_auto chose its transforms for float activations "
                                 f"(a_bits: null); set lrq_auto.a_bits: {bits}, or drop act_quant")]
            return [("bits", f"{bits}, but passes[{i}].lrq_auto chose its transforms for a_bits: {theirs}; give "
                             f"both the same width (lrq_auto.a_bits: {bits} or act_quant.bits: {theirs})")]
        return []

    def apply(self, state) -> None:
        c, model = self.config, state.model
        targets = select_layers(state, self.name, c.include, c.keep, finder=act_targets)
        rows = []
        for name, mod in tqdm(targets, desc=self.name, unit="layer", disable=not state.progress):
            if type(mod) is nn.Linear:
                mod = TransformedLinear.wrap(mod)
                set_module(model, name, mod)
            elif mod.act is None:                       # a QuantLinear quantized without any transform
                dev = mod.qweight.device
                mod.act = ActTransform(mod.in_features, device=dev)
            mod.act.set_act_bits(c.bits, c.zero_point)
            state.record(act_entry(name, mod))
            rows.append({"module": name, "method": self.name, "act_bits": c.bits, "granularity": c.granularity,
                         "zero_point": mod.act.zero_point, "input_transform": mod.act.describe()})
        state.add_pass_report(self.name, self.summarize(rows), rows)

    def summarize(self, rows: list[dict]) -> dict:
        return {"layers_act_quantized": len(rows), "act_bits": self.config.bits,
                "granularity": self.config.granularity,
                "zero_point_layers": sum(1 for r in rows if r["zero_point"])}
