"""`smooth` pass: SmoothQuant factors from the calibration statistics, folded upstream where that is exact.

One s per InputGroup the architecture declares (linears whose inputs are scaled together), absorbed at the
group's fold site (AdaLN norm + shift rows, or V's output rows: see arch/base.py and quant/smooth.py);
every other selected linear becomes a TransformedLinear that divides its input by its own s online.
Afterwards `state.calibration` reports the statistics of the smoothed inputs (absmax / s, rms / s): what
the layers now see, and what `ars` measures J on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..arch.base import NormFold, RowsFold
from ..errors import CalibrationError, ModelError, RecipeError
from ..lora.folds import record_fold
from ..nn.act import TransformedLinear, act_entry
from ..nn.surgery import affine_layernorm, affine_norm_entry, set_module
from ..quant.smooth import column_absmax, fold_into_modulated_norm_, fold_into_rows_, scale_columns_, smooth_factors
from ._weight_quant import WeightQuantPass
from .base import Pass, PassConfig, register_pass, select_layers

LATER_PASSES = ("smooth", "ars", "act_quant", "lrq_auto")   # smoothing comes before these (and the weight quantizers)


class SmoothConfig(PassConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="s = max|X|^alpha / max|W|^(1-alpha)")
    fold: bool = Field(True, description="absorb s where the architecture declares an exact fold site; "
                                         "false keeps every s online")
    include: tuple[str, ...] | None = Field(None, description="fnmatch patterns of linears to smooth; null = "
                                                               "the architecture's quantized linears")
    keep: tuple[str, ...] | None = Field(None, description="fnmatch patterns never smoothed; null = the "
                                                            "architecture's default")


@dataclass
class Group:
    members: list[str]                   # full linear names; they share one s
    fold: NormFold | RowsFold | None     # names relative to `block`
    block: str

    def site(self, rel: str) -> str:
        return f"{self.block}.{rel}"

    def label(self) -> str:
        f = self.fold
        if isinstance(f, NormFold):
            return f"fold:{f.norm}+{f.linear}[shift {f.shift}/{f.chunks}]"
        if isinstance(f, RowsFold):
            return f"fold:rows of {'+'.join(f.linears)}"
        return "online"


class SmoothedStats:
    """The calibration store seen through smoothing: per-linear statistics divided by that linear's s.
    Everything else (block inputs, meta) is the store's own: smoothing is exact, blocks see what they saw."""

    def __init__(self, store, scales: dict[str, torch.Tensor]):
        self._store, self._scales = store, scales

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._store, name)

    def linear_stats(self) -> dict[str, dict]:
        stats = self._store.linear_stats()
        for name, s in self._scales.items():
            if name in stats:
                st = stats[name]
                stats[name] = {**st, "absmax": st["absmax"] / s, "rms": st["rms"] / s}
        return stats


def _exists(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _is_linear(model: nn.Module, name: str) -> bool:
    return _exists(model, name) and hasattr(model.get_submodule(name), "in_features")


def plan_groups(model: nn.Module, adapter, selected: list[str], fold: bool) -> list[Group]:
    """Smoothing groups covering `selected`: the adapter's InputGroups with a selected member (all their
    present members join: they read the scaled tensor too), then one online group per other selected linear."""
    chosen, groups, claimed = set(selected), [], set()
    if fold:
        for ref in adapter.blocks(model):
            for g in adapter.input_groups.get(ref.stream, ()):
                # members that are still linears: a restructured FFN (dense2moe puts a MoEFFN at a FLUX single
                # block's proj_mlp) leaves the group, its experts then smooth online like other ungrouped linears
                members = [f"{ref.name}.{m}" for m in g.linears if _is_linear(model, f"{ref.name}.{m}")]
                if chosen.intersection(members):
                    groups.append(Group(members, g.fold, ref.name))
                    claimed.update(members)
    blocks = [ref.name for ref in adapter.blocks(model)]
    owner = {n: next((b for b in blocks if n.startswith(b + ".")), "") for n in selected}
    groups += [Group([n], None, owner[n]) for n in selected if n not in claimed]
    return groups


def block_order(groups: list[Group]) -> list[Group]:
    """Block by block, each block's groups in `fold_order` (folds never cross blocks), so a whole-model run and
    a block-by-block (streaming) run change the model, and record the manifest, in the same order."""
    blocks = dict.fromkeys(g.block for g in groups)
    return [g for b in blocks for g in fold_order([g for g in groups if g.block == b])]


def fold_order(groups: list[Group]) -> list[Group]:
    """Groups whose fold rescales another group's members come first: those members' weights must be final
    before their own s (which depends on their column absmax) is computed."""
    owner = {m: i for i, g in enumerate(groups) for m in g.members}
    succ = {i: set() for i in range(len(groups))}
    for i, g in enumerate(groups):
        if isinstance(g.fold, RowsFold):
            succ[i] |= {owner[g.site(t)] for t in g.fold.linears if g.site(t) in owner} - {i}
    indeg = {i: 0 for i in succ}
    for js in succ.values():
        for j in js:
            indeg[j] += 1
    ready, order = [i for i in succ if indeg[i] == 0], []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in sorted(succ[i]):
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(j)
    if len(order) != len(groups):
        raise ModelError("the architecture's fold sites form a cycle (a group folds into a group that folds into it)",
                         hint="fix the adapter's input_groups, or set smooth.fold: false")
    return [groups[i] for i in order]


def _check_fold_site(model: nn.Module, g: Group, width: int) -> str | None:
    """Why `g`'s declared fold site does not fit this model, or None."""
    f = g.fold
    if isinstance(f, NormFold):
        if not (_exists(model, g.site(f.norm)) and _exists(model, g.site(f.linear))):
            return f"{g.site(f.norm)} / {g.site(f.linear)} not found"
        norm, lin = model.get_submodule(g.site(f.norm)), model.get_submodule(g.site(f.linear))
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (width,):
            return f"{g.site(f.norm)} is {type(norm).__name__}, not a LayerNorm over {width} channels"
        if type(lin) is not nn.Linear or lin.out_features != f.chunks * width or lin.bias is None \
                or not 0 <= f.shift < f.chunks:
            return (f"{g.site(f.linear)} is not a plain nn.Linear with bias and {f.chunks} x {width} outputs "
                    f"(or it was quantized already)")
    elif isinstance(f, RowsFold):
        for t in f.linears:
            mod = model.get_submodule(g.site(t)) if _exists(model, g.site(t)) else None
            if type(mod) is not nn.Linear or mod.out_features != width:
                return f"{g.site(t)} is not a plain nn.Linear with {width} outputs"
    return None


def validate(model: nn.Module, groups: list[Group], stats: dict) -> None:
    """Every problem, before anything is changed."""
    for g in groups:
        for m in g.members:
            mod = model.get_submodule(m)
            if type(mod) is not nn.Linear:
                raise RecipeError(f"{m} is already a {type(mod).__name__}; smoothing rescales float weights, so it "
                                  "must run before ars, act_quant and the weight quantizers", key="smooth",
                                  hint="move `smooth` to the front of the passes")
            if m not in stats:
                raise CalibrationError(f"the calibration store has no input statistics for {m}",
                                       hint="capture calibration again with this model (the store belongs to "
                                            "another model or was captured with linear statistics off)")
        width = model.get_submodule(g.members[0]).in_features
        why = _check_fold_site(model, g, width)
        if why:
            raise ModelError(f"cannot fold smoothing of {', '.join(g.members)} into its declared site: {why}",
                             hint="set `smooth: {fold: false}` to keep every factor online")


def _fold(model: nn.Module, g: Group, s: torch.Tensor, state) -> None:
    f = g.fold
    # kept on the block so a LoRA can see the original input / emit the original scale (lora/folds.py)
    for m in g.members:
        record_fold(model, state, g.block, m[len(g.block) + 1:], "in", s)
    if isinstance(f, RowsFold):
        for t in f.linears:
            lin = model.get_submodule(g.site(t))
            fold_into_rows_(lin.weight, lin.bias, s)
            record_fold(model, state, g.block, t, "out", s)
        return
    lin, norm_name = model.get_submodule(g.site(f.linear)), g.site(f.norm)
    norm = model.get_submodule(norm_name)
    if norm.weight is None:
        norm = affine_layernorm(norm, device=lin.weight.device, dtype=lin.weight.dtype)
        set_module(model, norm_name, norm)
        state.record(affine_norm_entry(norm_name, norm))
    rows = slice(f.shift * s.numel(), (f.shift + 1) * s.numel())
    fold_into_modulated_norm_(norm.weight, norm.bias, lin.weight[rows], lin.bias[rows], s)
    record_fold(model, state, g.block, f.linear, "out", s, rows)


def group_factors(model: nn.Module, g: Group, stats: dict, alpha: float) -> torch.Tensor:
    """The group's shared s from its members' input absmax and their current weights (fp32 [C], on the CPU)."""
    act = torch.stack([stats[m]["absmax"].float() for m in g.members]).amax(0)
    weights = [model.get_submodule(m).weight for m in g.members]
    return smooth_factors(act, column_absmax(weights).cpu(), alpha)   # stats live on the CPU


def smooth_group(model: nn.Module, g: Group, stats: dict, alpha: float, state) -> tuple[torch.Tensor, list[dict]]:
    """Compute the group's s, rescale its members' weights and absorb 1/s (fold site or online vector)."""
    mods = [model.get_submodule(m) for m in g.members]
    s = group_factors(model, g, stats, alpha)
    sd = s.to(mods[0].weight.device)
    for name, mod in zip(g.members, mods):
        scale_columns_(mod.weight, sd)
        if g.fold is None:
            lin = TransformedLinear.wrap(mod)
            lin.act.set_smooth(sd)
            set_module(model, name, lin)
            state.record(act_entry(name, lin))
    if g.fold is not None:
        _fold(model, g, sd, state)
    rows = [{"module": m, "method": "smooth", "smoothing": g.label(), "group": g.members[0], "alpha": alpha,
             "s_min": round(float(s.min()), 5), "s_max": round(float(s.max()), 5),
             "input_absmax": round(float(stats[m]["absmax"].max()), 4),
             "input_absmax_smoothed": round(float((stats[m]["absmax"].float() / s).max()), 4)} for m in g.members]
    return s, rows


@register_pass
class Smooth(Pass):
    name = "smooth"
    Config = SmoothConfig
    needs_calibration = True
    streamable = True

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        for i, p in enumerate(previous):
            if isinstance(p, WeightQuantPass) or p.name in LATER_PASSES:
                return [("", f"smoothing must run before passes[{i}].{p.name} (it rescales float weights and "
                             "runs once, before rotation and quantization); move `smooth` up")]
        return []

    def apply(self, state) -> None:
        stats = self.calibration(state).linear_stats()
        c, model = self.config, state.model
        selected = [n for n, _ in select_layers(state, self.name, c.include, c.keep)]
        groups = plan_groups(model, state.adapter, selected, c.fold)
        validate(model, groups, stats)
        scales, rows = {}, []
        for g in tqdm(block_order(groups), desc=self.name, unit="group", disable=not state.progress):
            s, r = smooth_group(model, g, stats, c.alpha, state)
            scales.update({m: s for m in g.members})
            rows += r
        position = {n: i for i, (n, _) in enumerate(model.named_modules())}
        rows.sort(key=lambda r: position[r["module"]])
        state.calibration = SmoothedStats(state.calibration, scales)
        state.add_pass_report(self.name, self.summarize(rows), rows)

    def summarize(self, rows: list[dict]) -> dict:
        folded = sum(r["smoothing"] != "online" for r in rows)
        return {"layers_smoothed": len(rows), "folded": folded, "online": len(rows) - folded,
                "alpha": self.config.alpha}
