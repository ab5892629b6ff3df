"""What the depth passes (ppcl_depth, amber_depth, hybrid_stream) share: config keys, order rules, the
layer-wise distillation of each rebuilt group against the teacher's captured data, the optional end-to-end
distillation, and rebuilding the block lists."""
from __future__ import annotations

import time
from typing import Literal

from pydantic import Field
from torch import nn

from ..analysis import analyze_depth
from ..analysis.depth import DepthAnalysis
from ..distill import DistillConfig, EndToEndConfig, distill_block
from ..errors import RecipeError
from ..nn.surgery import set_block_list
from ..prune import list_of, teacher_io
from ._recovery import block_store, check_teacher, end_to_end
from .base import Pass, PassConfig

ALLOWED_BEFORE = ("depth_analysis",)   # passes that leave the blocks and their calibration names as captured


class DepthConfig(PassConfig):
    distill: DistillConfig = Field(default_factory=lambda: DistillConfig(steps=300, lr=1e-4, batch_size=16),
                                   description="layer-wise distillation of each rebuilt block: the teacher's input "
                                               "of its group -> the teacher's output of its group")
    loss: Literal["normalized_l2", "mse"] = Field("normalized_l2", description="layer-wise loss per stream: "
                                                                          "normalized_l2 (PPCL) | mse")
    end_to_end: EndToEndConfig | None = Field(None, description="then end-to-end distillation of the whole model "
                                                               "against the teacher's predictions; null = none")


class DepthPass(Pass):
    """Base of passes that change the block lists. They read the teacher's captured block inputs by block
    name, so they run first (after `depth_analysis` only), one per recipe."""

    needs_calibration = True
    needs_block_inputs = True
    changes_depth = True
    changes_structure = True

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.needs_teacher = self.config.end_to_end is not None

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        for i, p in enumerate(previous):
            if isinstance(p, DepthPass):
                return [("", f"passes[{i}].{p.name} already changed the depth; one depth pass per recipe (the "
                             "calibration's block inputs name the original blocks)")]
            if p.name not in ALLOWED_BEFORE:
                return [("", f"runs after passes[{i}].{p.name}; put depth passes first (before quantization, "
                             "smoothing or distillation), since they train blocks on the teacher's captured inputs")]
        return []

    # -- shared steps ------------------------------------------------------------------------------------
    def blocks(self, state):
        block_store(self.name, state, self.calibration(state))
        return state.adapter.blocks(state.model)

    def check_teacher(self, state) -> None:
        check_teacher(self.name, state, self.config.end_to_end)

    def distill_groups(self, state, refs, groups: list[tuple[int, int, nn.Module]]) -> list[dict]:
        """Train each (start, end, student) on the teacher's input of `start` -> output of `end`."""
        names, rows = [r.name for r in refs], []
        c = self.config
        for s, e, student in groups:
            t = time.perf_counter()
            inputs, targets = teacher_io(self.calibration(state), names, s, e)
            losses = distill_block(student, state.adapter, inputs, targets, c.distill, loss=c.loss,
                                   key=state.checkpoint_key(f"{self.name}:{s}-{e}"), checkpoint_dir=state.work_dir,
                                   progress=state.progress, desc=f"{self.name} {names[s]}..{names[e]}")
            rows.append({"start": s, "end": e, "first": names[s], "last": names[e], "steps": len(losses),
                         "loss_first": round(losses[0], 6) if losses else None,
                         "loss_last": round(losses[-1], 6) if losses else None,
                         "seconds": round(time.perf_counter() - t, 2)})
        return rows

    def end_to_end(self, state) -> dict | None:
        return end_to_end(self.name, state, self.calibration(state), self.config.end_to_end)


def rebuild_lists(state, refs, replace: dict[int, tuple[int, nn.Module | None]]) -> dict[str, int]:
    """New block lists: group start s -> (end, module) puts `module` where blocks s..e were (None removes the
    group). Returns the new length of every list."""
    lists = list_of(refs)
    new: dict[str, list[nn.Module]] = {attr: [] for attr, _ in state.adapter.block_lists}
    skip_to = -1
    for i, ref in enumerate(refs):
        if i <= skip_to:
            continue
        if i in replace:
            end, module = replace[i]
            if module is not None:
                new[lists[i]].append(module)
            skip_to = end
        else:
            new[lists[i]].append(state.model.get_submodule(ref.name))
    if not sum(len(b) for b in new.values()):
        raise ValueError("no block would be left")
    for attr, blocks in new.items():
        set_block_list(state.model, state.adapter, attr, blocks)
    return {attr: len(b) for attr, b in new.items()}


def removal_count(n_blocks: int, ratio: float | None, remove_blocks: int | None, key: str) -> int:
    """Blocks to remove from `ratio` (of all blocks, rounded) or `remove_blocks`; RecipeError when none would
    be removed or none would be left."""
    k = remove_blocks if remove_blocks is not None else round(ratio * n_blocks)
    if not 0 < k < n_blocks:
        raise RecipeError(f"removing {k} of the model's {n_blocks} blocks " +
                          ("leaves no block" if k >= n_blocks else "removes nothing"), key=key,
                          hint=f"choose a ratio / remove_blocks that keeps between 1 and {n_blocks - 1} blocks")
    return k


def analysis_for(state, max_interval: int, progress: bool):
    """The depth analysis a `depth_analysis` pass left in the report, or a fresh one."""
    rep = state.section("depth_analysis")
    if rep is not None:
        return DepthAnalysis.from_report(rep)
    return analyze_depth(state.model, state.adapter, state.calibration, max_interval=max_interval, progress=progress)


def block_params(model: nn.Module, adapter) -> int:
    return sum(p.numel() for attr, _ in adapter.block_lists for p in getattr(model, attr).parameters())
