"""`lrq_auto` pass: each InputGroup's input transform chosen by the quantized output error it gives.

Where `smooth` + `ars` apply fixed rules (one alpha everywhere; Hadamard or outlier-aware by J), this pass tries
every allowed candidate — none, smoothing at each alpha, Hadamard, outlier-aware rotation, smoothing followed by
a rotation — on each group's captured calibration inputs and keeps the one with the least
||X·Wᵀ - Qa(X·T)·Qw(W·T)ᵀ||² summed over the group's linears (quant/output_error.py), at the bits the recipe's
later weight quantizer and `act_quant` use. With `zero_points: [false, true]` each candidate is scored with the
symmetric and the asymmetric (zero-point) activation grid too, and the group's inputs get the better grid (the
later act_quant keeps it). Linears reading one tensor (an InputGroup) share the choice: one
fold, one online transform. The choice is applied with `smooth`'s and `ars`'s own steps (`smooth_group`,
`rotate_linear`), so the artifact is the one those passes would write for the same choices.

Groups go block by block in `smooth`'s fold order: a group whose smoothing folds into another group's rows
(FLUX: to_out's s into V) is decided and applied first, and the later group is then evaluated on its weights as
they are. Each group's inputs are captured once, on the block before any change: folds change only the input of
the group that folds.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ..calib.linear_inputs import block_linear_inputs
from ..errors import RecipeError
from ..nn.act import ActTransform, TransformedLinear, act_entry
from ..nn.surgery import set_module
from ..quant.hadamard import can_hadamard, random_signs
from ..quant.output_error import WeightGrid, error_db, quantized_output_errors
from ..quant.rotation import outlier_aware_rotation, rms_J
from ..quant.tlq import tlq_column_quantizer, tlq_dequantize, tlq_quantize
from ..quant.uniform import rtn_column_quantizer, rtn_dequantize, rtn_quantize
from ._weight_quant import WeightQuantPass
from .ars import ARSConfig, Choice, group_keys, layer_seed, rotate_linear
from .base import Pass, PassConfig, register_pass, select_layers
from .smooth import LATER_PASSES, SmoothedStats, block_order, group_factors, plan_groups, smooth_group, validate

CANDIDATES = ("none", "smooth", "hadamard", "outlier_aware", "smooth+hadamard", "smooth+outlier_aware")
GRIDS = {"tlq": WeightGrid(tlq_quantize, tlq_dequantize, tlq_column_quantizer),
         "rtn": WeightGrid(rtn_quantize, rtn_dequantize, rtn_column_quantizer)}


class LRQAutoConfig(PassConfig):
    candidates: tuple[Literal[CANDIDATES], ...] = Field(
        ("none", "smooth", "hadamard", "outlier_aware", "smooth+hadamard"),
        description="transforms tried per InputGroup; `smooth` and `smooth+...` are tried at every alpha")
    alphas: tuple[float, ...] = Field((0.3, 0.5, 0.7), description="SmoothQuant alphas tried (s = max|X|^alpha / "
                                                                   "max|W|^(1-alpha))")
    w_bits: int = Field(ge=2, le=8, description="bits of the later weight quantizer: a later tlq / rtn with other "
                                                "`bits` is a recipe error; with tlq bits: auto, the width the "
                                                "transforms are chosen for (the budget's widths come later, per "
                                                "layer: the budget's mean width is a fair choice)")
    a_bits: int | None = Field(ge=2, le=16, description="bits of the later act_quant (other `bits` there is a recipe "
                                                        "error); null = activations stay float (then no act_quant "
                                                        "may follow). Set with a weight pass after lrq_auto, it "
                                                        "needs an act_quant after lrq_auto too")
    weight_quantizer: Literal["tlq", "rtn"] = Field("tlq", description="the later weight quantizer's grid "
                                                                       "(per output channel); a later weight pass "
                                                                       "of the other kind is a recipe error")
    zero_points: tuple[bool, ...] = Field(
        (False,), description="activation grids tried per InputGroup with every candidate: [false] symmetric only, "
                              "[false, true] also the asymmetric grid (an integer zero point per token; helps "
                              "one-sided inputs, most at 4 bits), [true] asymmetric only. The choice is kept on "
                              "the layer; the later act_quant must leave its own zero_point unset")
    error: Literal["rounding", "gptq"] = Field(
        "rounding", description="weights in the error: nearest rounding on the grid, or GPTQ on it with the "
                                "transformed inputs' Hessian (slower; use when the weight pass has gptq: true)")
    rows_per_call: int = Field(16, ge=1, description="tokens sampled from each captured call for the error")
    weight_rows: int | None = Field(None, ge=1, description="output channels sampled per linear for the error "
                                                            "(per-channel quantization: rows are independent, so a "
                                                            "sample estimates the sum); null = all. Bounds the cost "
                                                            "of the weight quantizer's search on wide layers")
    fold: bool = Field(True, description="absorb smoothing where the architecture declares an exact fold site; "
                                         "false keeps every s online")
    block: int = Field(128, ge=2, description="channels per block of the outlier-aware rotation")
    steps: int = Field(256, ge=0, description="greedy rotation steps per block (outlier-aware)")
    seed: int = Field(0, description="seed of the Hadamard signs, the greedy rotations and the token sample")
    include: tuple[str, ...] | None = Field(None, description="fnmatch patterns of linears to transform; null = the "
                                                               "architecture's quantized linears")
    keep: tuple[str, ...] | None = Field(None, description="fnmatch patterns never transformed; null = the "
                                                            "architecture's default")

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError(f"candidates must be a non-empty list without repeats, from {list(CANDIDATES)}")
        return v

    @field_validator("zero_points")
    @classmethod
    def _zero_points(cls, v):
        if not v or len(set(v)) != len(v):
            raise ValueError("zero_points must be [false], [true] or [false, true]")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v):
        if not v or not all(0.0 <= a <= 1.0 for a in v):
            raise ValueError("alphas must be a non-empty list of values in [0, 1]")
        return v


def expand(candidates, alphas) -> list[tuple[str, float | None, str | None]]:
    """(label, alpha or None, rotation or None) for every candidate; smoothing ones once per alpha."""
    out = []
    for c in candidates:
        smooth, _, rot = c.partition("+") if c.startswith("smooth") else ("", "", c)
        rot = None if rot in ("", "none") else rot
        for a in (alphas if smooth else (None,)):
            out.append((c if a is None else f"{c}@{a:g}", a, rot))
    return out


def _transform(width: int, rot: str | None, seed: int, absmax: torch.Tensor, cfg, cache: dict) -> ActTransform:
    """The candidate's input transform (what the applied layer's `act` will hold), rotations built once per
    group and kept in `ars`'s cache layout so applying the winner reuses them."""
    act = ActTransform(width)           # rotation only: the caller divides by s (folded or online alike)
    if rot == "hadamard":
        act.set_hadamard(random_signs(width, seed))
    elif rot == "outlier_aware":
        hit = next((v for a, v in cache.get(seed, []) if torch.equal(a, absmax)), None)
        if hit is None:
            hit = outlier_aware_rotation(absmax, block=cfg.block, steps=cfg.steps, seed=seed)
            cache.setdefault(seed, []).append((absmax, hit))
        act.set_dense(hit[0])
    return act


def unavailable(rot: str | None, width: int, block: int) -> str | None:
    if rot == "hadamard" and not can_hadamard(width):
        return f"no Hadamard matrix of order {width}"
    if rot == "outlier_aware" and width % block:
        return f"in_features {width} is not a multiple of block {block}"
    return None


def _rows(w: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """`n` output channels of w, sampled without replacement (all when n is None or covers them)."""
    if n is None or n >= w.shape[0]:
        return w
    return w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values]


def evaluate(model, g, stats, xs: dict, seed: int, cfg: LRQAutoConfig, cache: dict) -> list[dict]:
    """Every candidate's summed output error on the group (x: the captured inputs of each member)."""
    grid, out = GRIDS[cfg.weight_quantizer], []
    ws = {m: _rows(model.get_submodule(m).weight.detach().float().cpu(), cfg.weight_rows, seed) for m in g.members}
    width = ws[g.members[0]].shape[1]
    raw = stats[g.members[0]]["absmax"].float()
    for label, alpha, rot in expand(cfg.candidates, cfg.alphas):
        why = unavailable(rot, width, cfg.block)
        if why:
            out.append({"candidate": label, "alpha": alpha, "rotation": rot, "unavailable": why})
            continue
        s = group_factors(model, g, stats, alpha) if alpha is not None else None
        act = _transform(width, rot, seed, raw if s is None else raw / s, cfg, cache)
        grids = cfg.zero_points if cfg.a_bits is not None else (False,)
        noise, signal = [0.0] * len(grids), 0.0
        for m in g.members:
            x, w = xs[m], ws[m]
            xt = act.rotate((x / s if s is not None else x).double())
            wt = act.rotate((w * s if s is not None else w).double())
            errs = quantized_output_errors(x, w, xt, wt, cfg.w_bits, cfg.a_bits, grid, cfg.error == "gptq", grids)
            noise = [a + n for a, (n, _) in zip(noise, errs)]
            signal += errs[0][1]
        for zp, n in zip(grids, noise):
            out.append({"candidate": label + ("+zp" if zp and len(grids) > 1 else ""), "alpha": alpha,
                        "rotation": rot, "zero_point": zp, "error": n, "signal": signal})
    return out


def apply_choice(model, g, stats, best: dict, seed: int, cfg: LRQAutoConfig, cache: dict, state):
    """`smooth_group` then `rotate_linear` on every member, as `smooth` and `ars` do, and the chosen activation
    grid on each member's transform; returns (s or None, J)."""
    s = None
    if best["alpha"] is not None:
        s, _ = smooth_group(model, g, stats, best["alpha"], state)
    st = stats[g.members[0]]
    J = rms_J((st["rms"].double() / (s.double() if s is not None else 1)) ** 2, 1)
    if best["rotation"] is None and not best["zero_point"]:
        return s, J
    rot = best["rotation"]
    rcfg = rot and ARSConfig(transform=rot, block=cfg.block, steps=cfg.steps, seed=cfg.seed)
    for m in g.members:
        mod = model.get_submodule(m)
        lin = mod if isinstance(mod, TransformedLinear) else TransformedLinear.wrap(mod)
        if rot is not None:
            absmax = stats[m]["absmax"].float() / (s if s is not None else 1)
            rotate_linear(lin, Choice(m, lin.in_features, J, rot, seed, g.members[0], absmax), rcfg, cache)
        lin.act.zero_point = best["zero_point"]      # act_quant sets the bits later and keeps the grid
        if lin is not mod:
            set_module(model, m, lin)
        state.record(act_entry(m, lin))
    return s, J


def choice_gain(totals: list[tuple[list[dict], dict]]) -> dict:
    """What choosing per group bought over one candidate everywhere, on the calibration tokens: the output SQNR
    of all groups together (noise and signal summed) under the choices, and under the best single candidate
    among those every group could take."""
    def pooled(picks):
        return error_db(sum(t["error"] for t in picks), sum(t["signal"] for t in picks))

    if not totals:
        return {}
    everywhere = set.intersection(*({t["candidate"] for t in tried if "error" in t} for tried, _ in totals))
    uniform = {c: pooled([next(t for t in tried if t["candidate"] == c) for tried, _ in totals])
               for c in sorted(everywhere)}
    chosen = pooled([best for _, best in totals])
    if not uniform or chosen is None or None in uniform.values():
        return {}
    top = max(uniform, key=uniform.get)
    return {"output_sqnr_db": round(chosen, 3), "best_uniform": top, "best_uniform_sqnr_db": round(uniform[top], 3),
            "choice_gain_db": round(chosen - uniform[top], 3)}


def _db(t: dict) -> float | None:
    db = error_db(t["error"], t["signal"]) if "error" in t else None
    return None if db is None else round(db, 3)


@register_pass
class LRQAuto(Pass):
    name = "lrq_auto"
    Config = LRQAutoConfig
    needs_calibration = True
    needs_block_inputs = True
    streamable = True

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        for i, p in enumerate(previous):
            if isinstance(p, WeightQuantPass) or p.name in LATER_PASSES:
                return [("", f"lrq_auto chooses smoothing and rotation on float weights, so it runs before "
                             f"passes[{i}].{p.name} and replaces `smooth` / `ars`; move it up (or drop those)")]
        return []

    def check_later(self, later: list[Pass]) -> list[tuple[str, str]]:
        """a_bits set and a weight pass after it, but no act_quant: the weights would be quantized for transforms
        chosen against activation quantization that never comes. (lrq_auto alone, with no weight pass after it,
        is an analysis or a first stage and stays allowed.)"""
        a = self.config.a_bits
        weights = next((p for p in later if isinstance(p, WeightQuantPass)), None)
        if a is None or weights is None or any(p.name == "act_quant" for p in later):
            return []
        return [("a_bits", f"{a} chooses the transforms for {a}-bit activations, but no act_quant follows "
                           f"(`{weights.name}` quantizes the weights only); add `act_quant: {{bits: {a}}}` after "
                           "lrq_auto, or set a_bits: null for weight-only quantization")]

    def apply(self, state) -> None:
        store = self.calibration(state)
        stats, c, model = store.linear_stats(), self.config, state.model
        selected = [n for n, _ in select_layers(state, self.name, c.include, c.keep)]
        groups = block_order(plan_groups(model, state.adapter, selected, c.fold))
        outside = [m for g in groups if not g.block for m in g.members]
        if outside:
            raise RecipeError(f"{', '.join(outside[:3])} lie outside the model's blocks: lrq_auto measures errors "
                              "on captured block inputs", key="lrq_auto.include",
                              hint="add those linears to lrq_auto.keep")
        validate(model, groups, stats)
        cands = expand(c.candidates, c.alphas)
        for g in groups:                                # every problem before any change
            width = model.get_submodule(g.members[0]).in_features
            whys = [unavailable(rot, width, c.block) for _, _, rot in cands]
            if all(whys):
                raise RecipeError(f"no candidate fits {', '.join(g.members)}: {'; '.join(dict.fromkeys(whys))}",
                                  key="lrq_auto.candidates", hint="add `none` or `smooth` to the candidates")
        keys, scales, rows, cache, totals = group_keys(model, state.adapter), {}, [], {}, []
        blocks = list(dict.fromkeys(g.block for g in groups))
        for block in tqdm(blocks, desc=self.name, unit="block", disable=not state.progress):
            mine = [g for g in groups if g.block == block]
            xs = block_linear_inputs(model.get_submodule(block), state.adapter, store.iter_block_inputs(block),
                                     {m: model.get_submodule(m) for g in mine for m in g.members},
                                     c.rows_per_call, seed=c.seed)
            for g in mine:
                seed = layer_seed(c.seed, keys.get(g.members[0], g.members[0]))
                tried = evaluate(model, g, stats, xs, seed, c, cache)
                best = min((t for t in tried if "error" in t), key=lambda t: t["error"])
                totals.append((tried, best))
                s, J = apply_choice(model, g, stats, best, seed, c, cache, state)
                if s is not None:
                    scales.update({m: s for m in g.members})
                errors = {t["candidate"]: _db(t) for t in tried}   # None: unavailable (or exact)
                rows += [{"module": m, "method": self.name, "group": g.members[0], "choice": best["candidate"],
                          "alpha": best["alpha"], "transform": best["rotation"] or "none",
                          "act_zero_point": best["zero_point"],
                          "smoothing": g.label() if s is not None else None, "J": round(J, 5),
                          "output_sqnr_db": errors[best["candidate"]], "candidates_sqnr_db": errors}
                         for m in g.members]
        position = {n: i for i, (n, _) in enumerate(model.named_modules())}
        rows.sort(key=lambda r: position[r["module"]])
        if scales:
            state.calibration = SmoothedStats(state.calibration, scales)
        state.add_pass_report(self.name, {**self.summarize(rows), **choice_gain(totals)}, rows)

    def summarize(self, rows: list[dict]) -> dict:
        firsts = {r["group"]: r for r in rows}.values()       # one row per group
        picks = [r["choice"] for r in firsts]
        c = self.config
        return {"groups": len(picks), "layers": len(rows), "choices": {k: picks.count(k) for k in sorted(set(picks))},
                "w_bits": c.w_bits, "a_bits": c.a_bits, "zero_points": list(c.zero_points),
                "weight_quantizer": c.weight_quantizer, "error": c.error}
