"""What the weight-only quantization passes (tlq, rtn) share: the config keys and the layer loop."""
from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from ..calib.hessian import block_hessians, hessian_phases
from ..errors import CalibrationError, RecipeError
from ..nn.qlinear import QuantLinear
from ..nn.surgery import set_module
from ..quant.codecs import get_codec
from ..quant.gptq import gptq_codes, hessian_quadratic_forms, sqnr_db
from ..quant.lowrank import lowrank_split
from ..quant.tlq import weight_error
from .base import Pass, PassConfig, last_named, select_layers

GROUP_SIZES = (64, 128)   # what the packed kernels are written for

# (w fp32 [out, in], bits, group_size | None) -> (codes, buffers, info with eta/percentile/sqnr_db)
Quantizer = Callable[[torch.Tensor, int, "int | None"], tuple[torch.Tensor, dict, dict]]
# (buffers, bits, group_size | None) -> gptq.ColumnQuantizer on that fixed grid
ColumnQuantizerFactory = Callable[[dict, int, "int | None"], Callable]


class WeightQuantConfig(PassConfig):
    bits: int = Field(ge=2, le=8, description="bits per weight")
    granularity: Literal["channel", "group"] = Field("channel", description="one scale per output channel, or "
                                                                             "one per group_size input weights")
    group_size: int = Field(128, description="weights per scale along in_features; only with granularity: group")
    include: tuple[str, ...] | None = Field(None, description="fnmatch patterns of linears to quantize; "
                                                               "null = the architecture's default")
    keep: tuple[str, ...] | None = Field(None, description="fnmatch patterns never quantized; null = the "
                                                            "architecture's default")
    gptq: bool = Field(False, description="GPTQ error feedback: keep the grid, choose levels column by column "
                                          "so the layer's output error on calibration inputs is minimised; "
                                          "needs calibration with block inputs")
    gptq_damp: float = Field(0.01, gt=0, le=1, description="GPTQ dampening, a fraction of mean(diag H) added "
                                                            "to H's diagonal")
    gptq_act_order: bool = Field(True, description="GPTQ: quantize input channels by decreasing energy")
    lowrank_rank: int = Field(0, ge=0, description="SVDQuant: keep the top-`lowrank_rank` SVD part of each weight "
                                                   "(as smoothed / rotated) as a bf16 branch on the unquantized "
                                                   "input and quantize only the residual; 0 = off. With tlq "
                                                   "bits: auto the branch's 2·R·(in + out) bytes count inside the "
                                                   "budget")

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {v}")
        return v

    @model_validator(mode="after")
    def _gptq_keys_need_gptq(self):
        if not self.gptq and {"gptq_damp", "gptq_act_order"} & self.model_fields_set:
            raise ValueError("gptq_damp / gptq_act_order apply only with gptq: true")
        return self

    @model_validator(mode="after")
    def _group_size_needs_group(self):
        if "group_size" in self.model_fields_set and self.granularity != "group":
            raise ValueError("group_size applies only to granularity: group; set granularity: group or "
                             "remove group_size")
        return self

    @property
    def effective_group_size(self) -> int | None:
        return self.group_size if self.granularity == "group" else None


def quantize_linears(state, pass_name: str, config: WeightQuantConfig, codec: str, quantize: Quantizer,
                     column_quantizer: ColumnQuantizerFactory | None = None, bits_of: dict[str, int] | None = None,
                     extra: dict[str, dict] | None = None, summary: dict | None = None) -> None:
    """Replace every selected nn.Linear by a QuantLinear (codec `codec`), record it in the manifest and
    add the pass's report (one row per layer). With `config.gptq`, block by block: the block's input
    Hessians are collected, then its linears take GPTQ codes on the grid `quantize` chose. `bits_of`: a width
    per layer name instead of config.bits (bits: auto); `extra` / `summary`: added to its rows / the summary."""
    targets = select_layers(state, pass_name, config.include, config.keep)
    gs, rows, n = config.effective_group_size, [], len(targets)
    check_lowrank(pass_name, config.lowrank_rank, targets)
    with BlockHessians(state, [t[0] for t in targets]) if config.gptq else nullcontext() as hessians:
        bar = tqdm(total=n, desc=pass_name, unit="layer", disable=not state.progress)
        targets.reverse()
        while targets:        # popped, so a float linear is freed once its QuantLinear replaces it
            name, linear = targets.pop()
            w = linear.weight.detach().float()
            bits = bits_of[name] if bits_of else config.bits
            lowrank, row, full = None, {}, w
            if config.lowrank_rank:      # the quantizer and GPTQ see only what the branch leaves: the residual
                up, down, w = lowrank_split(full, config.lowrank_rank)
                lowrank = (up.to(linear.weight.device), down.to(linear.weight.device))
                row = {"lowrank_rank": config.lowrank_rank,
                       "lowrank_residual_rel": float(w.norm() / full.norm().clamp_min(1e-30))}
            # a quantizer marked `uses_hessian` chooses its grid from the layer's calibration Hessian too
            hess = {"hessian": hessians.load(name)} if getattr(quantize, "uses_hessian", False) \
                and hessians is not None and hessians.covers(name) else {}
            codes, buffers, info = quantize(w, bits, gs, **hess)
            del hess
            dq = get_codec(codec).dequantize
            if hessians is not None and hessians.covers(name):
                # a 15360-wide layer's Hessian is 0.9 GB: whole in memory only while GPTQ works in it; the output
                # errors read it from disk in row blocks
                signal, noise_rounding = hessians.quadratic(name, [full, w - dq(codes, buffers, bits, gs)])
                del codes
                codes = gptq_codes(w, hessians.load(name), column_quantizer(buffers, bits, gs),
                                   damp=config.gptq_damp, act_order=config.gptq_act_order, overwrite=True)
                w_hat = dq(codes, buffers, bits, gs)
                info = {**info, **weight_error(w, w_hat)}
                noise, = hessians.quadratic(name, [w - w_hat])
                del w_hat
                row.update({"output_sqnr_db": _finite(sqnr_db(signal, noise)),
                            "output_sqnr_db_rounding": _finite(sqnr_db(signal, noise_rounding))})
            if lowrank is not None:      # errors against the whole weight: the branch's part is exact
                info = {**info, **weight_error(full, full - w + dq(codes, buffers, bits, gs))}
            # a TransformedLinear's weight is already in its input transform's basis: the transform moves along
            q = QuantLinear.from_linear_codes(linear, codes, buffers, codec, bits, gs,
                                              act=getattr(linear, "act", None), lowrank=lowrank)
            del codes, w, full, linear
            set_module(state.model, name, q)
            state.record(q.manifest_entry(name))
            rows.append({"module": name, "method": pass_name, "bits": bits, "group_size": gs,
                         "eta": info["eta"], "percentile": info["percentile"],
                         "sqnr_db": _finite(info["sqnr_db"]), **row,   # None = exact
                         **info.get("report", {}),                     # a quantizer's own per-layer fields
                         "shape": [q.out_features, q.in_features],
                         **(extra or {}).get(name, {})})
            bar.update(1)
        bar.close()
    state.add_pass_report(pass_name, {**summarize_weight_quant(rows, config.gptq), **(summary or {})}, rows)


def check_lowrank(pass_name: str, rank: int, targets: list) -> None:
    """Every layer too narrow for the branch's rank, before any layer is changed."""
    narrow = [n for n, m in targets if rank and rank >= min(m.in_features, m.out_features)]
    if narrow:
        raise RecipeError(f"lowrank_rank {rank} is not below min(in_features, out_features) of {len(narrow)} "
                          f"layer(s), e.g. {', '.join(narrow[:3])}", key=f"{pass_name}.lowrank_rank",
                          hint="lower lowrank_rank, or leave those layers out with `keep`")


def summarize_weight_quant(rows: list[dict], gptq: bool) -> dict:
    sqnr = [r["sqnr_db"] for r in rows if r["sqnr_db"] is not None]
    summary = {"layers_quantized": len(rows), "mean_sqnr_db": sum(sqnr) / len(sqnr) if sqnr else None,
               "min_sqnr_db": min(sqnr) if sqnr else None}
    if gptq:
        gain = [r["output_sqnr_db"] - r["output_sqnr_db_rounding"] for r in rows
                if r.get("output_sqnr_db") is not None and r.get("output_sqnr_db_rounding") is not None]
        summary["gptq_mean_output_gain_db"] = sum(gain) / len(gain) if gain else None
    return summary


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class BlockHessians:
    """The targets' input Hessians, block by block, held on disk: when a block's first target is asked for (all
    its targets are still float then: targets come in block order), every phase of that block is collected
    (`hessian_phases`, one block forward each) and written to a temporary directory as raw float32, so the
    block's float linears can be freed one by one as they are quantized and GPTQ holds one Hessian at a time
    (plain reads, not memory maps: mapped pages would count as resident)."""

    def __init__(self, state, names: list[str]):
        self.state = state
        blocks = [b.name for b in state.adapter.blocks(state.model)]
        self.owner = {n: next((b for b in blocks if n.startswith(b + ".")), None) for n in names}
        self.names, self.block, self.shapes = names, None, {}

    def __enter__(self) -> "BlockHessians":
        base = self.state.work_dir if self.state.work_dir is not None and self.state.work_dir.is_dir() else None
        self._tmp = tempfile.TemporaryDirectory(prefix="dicompress-hessians-", dir=base)
        self.dir = Path(self._tmp.name)
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def covers(self, name: str) -> bool:
        """Whether `name` lies in one of the adapter's blocks (GPTQ needs that block's inputs)."""
        return self.owner.get(name) is not None

    def _path(self, name: str) -> Path:
        if self.owner[name] != self.block:
            self._collect(self.owner[name])
        return self.dir / f"{name}.f32"

    def load(self, name: str) -> torch.Tensor:
        path = self._path(name)
        n = self.shapes[name]
        return torch.from_numpy(np.fromfile(path, dtype=np.float32)).view(n, n)

    def quadratic(self, name: str, mats: list[torch.Tensor], rows: int = 256) -> list[float]:
        """tr(M H Mᵀ) for each M, H read from disk a row block at a time."""
        path, n = self._path(name), self.shapes[name]

        def blocks():
            for r0 in range(0, n, rows):
                k = min(rows, n - r0)
                rows_ = np.fromfile(path, dtype=np.float32, count=k * n, offset=r0 * n * 4)
                yield r0, torch.from_numpy(rows_).view(k, n)
        return hessian_quadratic_forms(mats, blocks())

    def _collect(self, block: str) -> None:
        for f in self.dir.iterdir():
            f.unlink()
        model, store = self.state.model, self.state.calibration
        linears = {n: model.get_submodule(n) for n in self.names if self.owner[n] == block}
        for phase in hessian_phases(linears):
            hs = block_hessians(model.get_submodule(block), self.state.adapter, store.iter_block_inputs(block),
                                {n: linears[n] for n in phase})
            for n in phase:
                h = hs.pop(n)
                h.numpy().tofile(self.dir / f"{n}.f32")      # raw file reads: never memory-mapped, never re-serialised
                self.shapes[n] = h.shape[0]
                del h
        self.block = block


class WeightQuantPass(Pass):
    """Base of weight quantizers: one order rule, since a quantized linear cannot be quantized again."""

    streamable = True

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        # GPTQ reads each block's captured inputs; plain rounding needs no data
        self.needs_calibration = self.needs_block_inputs = self.config.gptq

    def apply(self, state) -> None:
        if self.config.gptq:
            store = self.calibration(state)
            if not store.has_block_inputs:
                raise CalibrationError(f"{self.name} with gptq: true needs the calibration's block inputs, "
                                       "but this store holds statistics only",
                                       hint="set `calibration.block_inputs: auto` (or true) and capture again")
        self.quantize(state)

    def quantize(self, state) -> None:
        raise NotImplementedError

    def summarize(self, rows: list[dict]) -> dict:
        return summarize_weight_quant(rows, self.config.gptq)

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        mine = (self.config.include, self.config.keep)
        for i, p in enumerate(previous):
            if isinstance(p, WeightQuantPass) and (p.config.include, p.config.keep) == mine:
                return [("", f"quantizes the same linears as passes[{i}].{p.name}; give one of them "
                             "disjoint `include` / `keep` patterns, or drop one")]
        return self._agrees_with_lrq_auto(previous)

    def _agrees_with_lrq_auto(self, previous: list[Pass]) -> list[tuple[str, str]]:
        """An earlier lrq_auto chose its transforms for this pass's grid and width: they must be the ones used.
        bits: auto is let through (the widths are chosen later, per layer; lrq_auto.w_bits is then the width the
        transforms are chosen for)."""
        hit = last_named(previous, "lrq_auto")
        if hit is None:
            return []
        i, c = hit[0], hit[1].config
        if c.weight_quantizer != self.name:
            return [("", f"passes[{i}].lrq_auto chose its transforms for the {c.weight_quantizer} grid "
                         f"(weight_quantizer: {c.weight_quantizer}), but this pass quantizes on the {self.name} "
                         f"grid; set lrq_auto.weight_quantizer: {self.name}, or use `{c.weight_quantizer}` here")]
        if self.config.bits != "auto" and self.config.bits != c.w_bits:
            return [("bits", f"{self.config.bits}, but passes[{i}].lrq_auto chose its transforms for w_bits: "
                             f"{c.w_bits}; give both the same width (lrq_auto.w_bits: {self.config.bits} or "
                             f"{self.name}.bits: {c.w_bits})")]
        return []
