"""`ars` pass: LRQ-DiT's Adaptive Rotation Scheme, with J computed per layer from calibration data.

For each selected linear, J = RMS of its calibration inputs (of the smoothed inputs when `smooth` ran: the
store then reports those). J < threshold: randomised Hadamard diag(signs)·H, applied online in O(n log n);
J ≥ threshold: DuQuant's outlier-aware R1·P·R2 from the per-channel absmax, stored as a dense matrix.
The weight is rotated offline (W·Q) and the input online by the layer's ActTransform, so without
quantization the model computes what it did. Linears of one InputGroup share the seed, so linears reading
one tensor get one transform (a fused kernel rotates that tensor once). Every layer's width is checked
before anything changes.
"""
from __future__ import annotations

import statistics
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, RecipeError
from ..nn.act import TransformedLinear, act_entry
from ..nn.surgery import set_module
from ..quant.hadamard import can_hadamard, random_signs
from ..quant.rotation import choose_rotation, outlier_aware_rotation, rms_J
from ._weight_quant import WeightQuantPass
from .base import Pass, PassConfig, register_pass, select_layers


class ARSConfig(PassConfig):
    threshold: float = Field(1.0, ge=0.0, description="J below: Hadamard; at or above: outlier-aware")
    transform: Literal["auto", "hadamard", "outlier_aware"] = Field(
        "auto", description="auto: chosen per layer by J; hadamard / outlier_aware: that one everywhere (ablations)")
    block: int = Field(128, ge=2, description="channels per block of the outlier-aware rotation")
    steps: int = Field(256, ge=0, description="greedy rotation steps per block (outlier-aware)")
    seed: int = Field(0, description="seed of the Hadamard signs and the greedy rotations")
    include: tuple[str, ...] | None = Field(None, description="fnmatch patterns of linears to rotate; null = the "
                                                               "architecture's quantized linears")
    keep: tuple[str, ...] | None = Field(None, description="fnmatch patterns never rotated; null = the "
                                                            "architecture's default")

    @model_validator(mode="after")
    def _threshold_needs_auto(self):
        if "threshold" in self.model_fields_set and self.transform != "auto":
            raise ValueError("threshold applies only to transform: auto; remove threshold or set transform: auto")
        return self


@dataclass
class Choice:
    module: str
    width: int
    J: float
    transform: str          # "hadamard" | "outlier_aware"
    seed: int
    group: str              # first linear of its InputGroup (or itself): shared seed
    absmax: torch.Tensor    # per-channel input absmax, as the layer sees it now


def group_keys(model: nn.Module, adapter) -> dict[str, str]:
    """Full linear name -> the first linear of its InputGroup (linears in no group are absent)."""
    keys = {}
    for ref in adapter.blocks(model):
        for g in getattr(adapter, "input_groups", {}).get(ref.stream, ()):
            names = [f"{ref.name}.{m}" for m in g.linears]
            keys.update({n: names[0] for n in names})
    return keys


def layer_seed(seed: int, group: str) -> int:
    """A per-group seed that does not depend on which other layers are selected."""
    return (seed * 1_000_003 + zlib.crc32(group.encode())) % (2 ** 31)


def plan(targets: list[tuple[str, nn.Linear]], stats: dict, keys: dict[str, str], cfg: ARSConfig) -> list[Choice]:
    """J and transform for every target; raises one error listing every layer that cannot be rotated."""
    missing = [n for n, _ in targets if n not in stats]
    if missing:
        raise CalibrationError(f"the calibration store has no input statistics for {', '.join(missing[:5])}"
                               + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""),
                               hint="capture calibration again with this model")
    choices, problems = [], []
    for name, mod in targets:
        act = getattr(mod, "act", None)
        if act is not None and act.rotation_kind is not None:
            problems.append(f"{name} is already rotated ({act.rotation_kind}); run `ars` once")
            continue
        st, width = stats[name], mod.in_features
        J = rms_J(st["rms"].double() ** 2, 1)
        kind = cfg.transform if cfg.transform != "auto" else choose_rotation(J, cfg.threshold)
        if kind == "hadamard" and not can_hadamard(width):
            problems.append(f"{name}: no Hadamard matrix of order {width} here (J = {J:.3g}); add it to ars.keep, "
                            f"or rotate it with transform: outlier_aware and a block dividing {width}")
        elif kind == "outlier_aware" and width % cfg.block:
            problems.append(f"{name}: in_features {width} is not a multiple of ars.block = {cfg.block} (J = {J:.3g}); "
                            f"set ars.block to a divisor of {width}, or add the layer to ars.keep")
        group = keys.get(name, name)
        choices.append(Choice(name, width, J, kind, layer_seed(cfg.seed, group), group, st["absmax"].float()))
    if problems:
        raise RecipeError(f"{len(problems)} layer(s) cannot be rotated:\n  " + "\n  ".join(problems), key="ars")
    return choices


def rotate_linear(lin: TransformedLinear, ch: Choice, cfg: ARSConfig, cache: dict) -> dict:
    """Set the chosen rotation Q on `lin`'s input transform and fold it into the weight (W <- W·Q, through the
    same `rotate` the forward uses, in float64); returns report extras."""
    extra = {}
    if ch.transform == "hadamard":
        lin.act.set_hadamard(random_signs(ch.width, ch.seed).to(lin.weight.device))
    else:
        hit = next((v for a, v in cache.get(ch.seed, []) if torch.equal(a, ch.absmax)), None)
        if hit is None:                                 # linears reading one tensor share it: computed once
            hit = outlier_aware_rotation(ch.absmax, block=cfg.block, steps=cfg.steps, seed=ch.seed)
            cache.setdefault(ch.seed, []).append((ch.absmax, hit))
        rot, info = hit
        lin.act.set_dense(rot.to(lin.weight.device))
        extra = {"absmax_ratio_before": round(info["ratio_before"], 3),
                 "absmax_ratio_after_est": round(info["ratio_after"], 3)}
    w = lin.weight
    rows = max(1, (8 << 20) // w.shape[1])         # rows rotate independently: 64 MB of float64 at a time
    with torch.no_grad():
        for r0 in range(0, w.shape[0], rows):
            w[r0:r0 + rows] = lin.act.rotate(w[r0:r0 + rows].double()).to(w.dtype)
    return extra


@register_pass
class ARS(Pass):
    name = "ars"
    Config = ARSConfig
    needs_calibration = True
    streamable = True

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        for i, p in enumerate(previous):
            if isinstance(p, WeightQuantPass) or p.name in ("ars", "act_quant", "lrq_auto"):
                return [("", f"rotation must run before passes[{i}].{p.name} (it rotates float weights, once, "
                             "before any quantization); move `ars` up")]
            if getattr(p.config, "widths", "hadamard") != "hadamard":
                # width pruning (width_prune, mask_prune) keeps arbitrary widths; a rotation needs a Hadamard
                # order, which would be found missing only after the pruning ran
                return [("", f"rotation after passes[{i}].{p.name} needs widths it can rotate: set "
                             f"`widths: hadamard` in passes[{i}].{p.name} (kept widths moved to Hadamard orders)")]
        return []

    def apply(self, state) -> None:
        stats = self.calibration(state).linear_stats()   # J is computed from them
        c, model = self.config, state.model
        targets = select_layers(state, self.name, c.include, c.keep)
        choices = plan(targets, stats, group_keys(model, state.adapter), c)
        rows, cache = [], {}
        for ch in tqdm(choices, desc=self.name, unit="layer", disable=not state.progress):
            mod = model.get_submodule(ch.module)
            lin = mod if isinstance(mod, TransformedLinear) else TransformedLinear.wrap(mod)
            extra = rotate_linear(lin, ch, c, cache)
            if lin is not mod:
                set_module(model, ch.module, lin)
            state.record(act_entry(ch.module, lin))
            rows.append({"module": ch.module, "method": self.name, "J": round(ch.J, 5), "transform": ch.transform,
                         "in_features": ch.width, "group": ch.group, "seed": ch.seed, **extra})
        state.add_pass_report(self.name, self.summarize(rows), rows)

    def summarize(self, rows: list[dict]) -> dict:
        c, js = self.config, [r["J"] for r in rows]
        return {"layers_rotated": len(rows), "hadamard": sum(r["transform"] == "hadamard" for r in rows),
                "outlier_aware": sum(r["transform"] == "outlier_aware" for r in rows),
                "threshold": c.threshold if c.transform == "auto" else None,
                "J_min": min(js, default=None), "J_median": round(statistics.median(js), 5) if js else None,
                "J_max": max(js, default=None)}
