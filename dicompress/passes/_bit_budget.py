"""`bits: auto` for the weight quantizers: bit widths per layer from a byte budget.

Each selected linear is quantized at every candidate width (GPTQ included when the pass has `gptq: true`) and
its output error tr(ΔW H ΔWᵀ) on the calibration inputs is measured (H: the block-input Hessians the GPTQ path
collects); quant/bit_budget.allocate then picks one width per layer so that the packed bytes meet the budget
with the least total error. The pass quantizes again at the chosen widths (GPTQ is deterministic on the same
Hessian, so each layer's final error is the one measured). With `lowrank_rank` R, what is measured is what the pass
quantizes, the residual after the bf16 branch, and the branch's 2·R·(in + out) bytes count in every option's cost
(a fixed cost per layer: the widths share what the branches leave of the budget).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..config import StrictModel
from ..errors import RecipeError
from ..nn.surgery import iter_linears
from ..quant.bit_budget import Allocation, allocate, feasible_range
from ..quant.codecs import get_codec
from ..quant.gptq import gptq_codes
from ..quant.lowrank import BRANCH_DTYPE, lowrank_split
from ..quant.packing import packed_bytes

BF16 = 2


class BitBudget(StrictModel):
    bytes_fraction: float | None = Field(None, gt=0, le=1, description=(
        "packed bytes of the quantized linears (codes + scales + grid, and the bf16 low-rank branch when lowrank_rank "
        "is set) over their bf16 bytes, biases and input transforms (smooth / ars) excluded: the bench's "
        "`ratio_quantized_linears` without transforms "
        "(per-channel TLQ on the embedded model: W3 0.215, W4 0.278); "
        "a budget outside what all-lowest / all-highest candidates give is a recipe error"))
    avg_bits: float | None = Field(None, ge=2, le=8, description=(
        "mean code width per weight (weighted by weight count; scales, grid and any low-rank branch on top, as at "
        "uniform bits): the same bytes as uniform `bits: avg_bits` (with the same lowrank_rank) when integral"))
    candidates: tuple[int, ...] = Field((2, 3, 4, 5, 6, 7, 8), description="bit widths a layer may take (2..8)")
    weighting: Literal["output", "relative"] = Field("relative", description=(
        "error summed over layers: `output` = tr(ΔW H ΔWᵀ) as is; `relative` = over the layer's output energy "
        "tr(W H Wᵀ) (1 / output SQNR), so layers of different output scale count alike"))

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.bytes_fraction is None) == (self.avg_bits is None):
            raise ValueError("give exactly one of bytes_fraction / avg_bits")
        if not self.candidates or not all(2 <= b <= 8 for b in self.candidates) \
                or len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates must be distinct bit widths in 2..8")
        if self.avg_bits is not None and not min(self.candidates) <= self.avg_bits <= max(self.candidates):
            raise ValueError(f"avg_bits {self.avg_bits} lies outside the candidates "
                             f"{min(self.candidates)}..{max(self.candidates)}")
        return self


def layer_bytes(codec: str, out_features: int, in_features: int, bits: int, group_size: int | None,
                lowrank_rank: int = 0) -> int:
    """Packed bytes of one QuantLinear's weight (QuantLinear.weight_bytes without an input transform): codes,
    codec tensors and the rank-`lowrank_rank` branch's two factors."""
    specs = get_codec(codec).buffer_specs(out_features, in_features, bits, group_size)
    extra = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in specs.values())
    codes = out_features * packed_bytes(in_features, bits)
    return codes + extra + branch_bytes(out_features, in_features, lowrank_rank)


def branch_bytes(out_features: int, in_features: int, lowrank_rank: int) -> int:
    """The low-rank branch's factors up [out, r] and down [r, in] (bf16); 0 without a branch."""
    return lowrank_rank * (out_features + in_features) * torch.empty((), dtype=BRANCH_DTYPE).element_size()


def cost_table(shapes: list[tuple[int, int]], codec: str, candidates, group_size,
               lowrank_rank: int = 0) -> list[list[int]]:
    return [[layer_bytes(codec, o, i, b, group_size, lowrank_rank) for b in candidates] for o, i in shapes]


def budget_bytes(budget: BitBudget, shapes: list[tuple[int, int]], codec: str, group_size,
                 lowrank_rank: int = 0) -> int:
    """The budget in packed bytes of the layers `shapes` ([out, in] each)."""
    if budget.bytes_fraction is not None:
        return math.floor(budget.bytes_fraction * sum(o * i * BF16 for o, i in shapes))
    # codes at avg_bits (a row packs in runs of 8 codes) + the codec tensors and the branch, whose size does not
    # depend on bits
    return math.floor(sum(layer_bytes(codec, o, i, 8, group_size, lowrank_rank) - o * packed_bytes(i, 8)
                          + o * packed_bytes(i, 1) * budget.avg_bits for o, i in shapes))


def budget_problem(budget: BitBudget, shapes: list[tuple[int, int]], codec: str, group_size,
                   lowrank_rank: int = 0) -> str | None:
    """Why no assignment of the candidates meets the budget (None: one does)."""
    lo, hi = feasible_range(cost_table(shapes, codec, budget.candidates, group_size, lowrank_rank))
    need = budget_bytes(budget, shapes, codec, group_size, lowrank_rank)
    if lo <= need <= hi:
        return None
    dense, side = sum(o * i * BF16 for o, i in shapes), "below" if need < lo else "above"
    edge = (min if need < lo else max)(budget.candidates)
    branch = f" with its rank-{lowrank_rank} low-rank branch" if lowrank_rank else ""
    return (f"the budget ({need} bytes) is {side} every layer at {edge} bits{branch} "
            f"({lo if need < lo else hi} bytes): "
            f"bytes_fraction must lie in [{lo / dense:.4f}, {hi / dense:.4f}] for these {len(shapes)} layers "
            f"(candidates {list(budget.candidates)})")


def budget_field(budget: BitBudget) -> str:
    return "budget.bytes_fraction" if budget.bytes_fraction is not None else "budget.avg_bits"


def check_budget(budget: BitBudget, shapes: list[tuple[int, int]], codec: str, group_size, pass_name: str,
                 lowrank_rank: int = 0) -> None:
    """RecipeError naming the budget's key when no assignment of the candidates meets it."""
    problem = budget_problem(budget, shapes, codec, group_size, lowrank_rank)
    if problem:
        raise RecipeError(problem, key=f"{pass_name}.{budget_field(budget)}",
                          hint="a budget inside that range, or other `budget.candidates`"
                               + (" (or a lower lowrank_rank)" if lowrank_rank else ""))


def budget_shapes(model, adapter, include, keep) -> list[tuple[int, int]]:
    """[out, in] of the linears a pass with these patterns would quantize (the model may be on meta)."""
    include = include if include is not None else adapter.quant_include
    keep = keep if keep is not None else adapter.quant_keep
    return [(m.out_features, m.in_features) for _, m in iter_linears(model, include, keep)]


def measure_errors(targets, hessians, config, codec: str, quantize, column_quantizer) -> list[dict]:
    """Per layer: {"signal": tr(W H Wᵀ), "noise": {bits: tr(ΔW H ΔWᵀ)}} at every candidate width, with GPTQ
    when config.gptq. A layer outside every block (no Hessian) is measured in weight space (H = I). With
    config.lowrank_rank, ΔW is the quantized residual's error (the branch is exact), as quantize_linears makes it."""
    dq, gs, out = get_codec(codec).dequantize, config.effective_group_size, []
    for name, linear in targets:
        full = w = linear.weight.detach().float()
        if config.lowrank_rank:
            *_, w = lowrank_split(full, config.lowrank_rank)
        covered = hessians.covers(name)
        quad = (lambda mats: hessians.quadratic(name, mats)) if covered else \
            (lambda mats: [float(m.double().pow(2).sum()) for m in mats])
        noise = {}
        for b in config.budget.candidates:
            codes, buffers, _ = quantize(w, b, gs)
            if config.gptq and covered:
                codes = gptq_codes(w, hessians.load(name), column_quantizer(buffers, b, gs),
                                   damp=config.gptq_damp, act_order=config.gptq_act_order, overwrite=True)
            noise[b], = quad([w - dq(codes, buffers, b, gs)])
        signal, = quad([full])
        out.append({"signal": signal, "noise": noise, "hessian": covered})
    return out


def choose_bits(names, shapes, measured, budget: BitBudget, codec: str, group_size,
                lowrank_rank: int = 0) -> tuple[dict, Allocation, dict]:
    """({name: bits}, the allocation, summary) for the measured errors under the budget (bytes with the
    rank-`lowrank_rank` branches)."""
    cand = budget.candidates
    costs = cost_table(shapes, codec, cand, group_size, lowrank_rank)

    def weight(m):
        return 1.0 / m["signal"] if budget.weighting == "relative" and m["signal"] > 0 else 1.0
    errors = [[m["noise"][b] * weight(m) for b in cand] for m in measured]
    need = budget_bytes(budget, shapes, codec, group_size, lowrank_rank)
    alloc = allocate(costs, errors, need)
    bits = {n: cand[k] for n, k in zip(names, alloc.choice)}
    dense = sum(o * i * BF16 for o, i in shapes)
    n_weights = sum(o * i for o, i in shapes)
    summary = {"budget_bytes": need, "achieved_bytes": alloc.cost, "budget_fraction": round(need / dense, 5),
               "achieved_fraction": round(alloc.cost / dense, 5),
               "mean_bits": round(sum(bits[n] * o * i for n, (o, i) in zip(names, shapes)) / n_weights, 4),
               "bits_histogram": {str(b): sum(v == b for v in bits.values()) for b in cand},
               "weighting": budget.weighting, "total_error": alloc.error,
               **({"lowrank_branch_bytes": sum(branch_bytes(o, i, lowrank_rank) for o, i in shapes)}
                  if lowrank_rank else {})}
    return bits, alloc, summary
