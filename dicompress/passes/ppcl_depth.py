"""`ppcl_depth` pass (PPCL): replace contiguous intervals of blocks by one trained block each.

Each interval [s, e] (global block indices, inclusive, inside one block list) becomes one block initialised
from teacher block (s+e)//2 and trained on the teacher's captured input at s against the teacher's output
at e (normalised L2 per stream). Every interval trains on teacher data only, so intervals are independent:
the artifact keeps the teacher blocks each one replaced (`ppcl_intervals.safetensors`), and
`dicompress.load(path, plug=[...])` plugs any subset of them in (the others get their teacher blocks back).
With `intervals: auto` the intervals come from the depth analysis (a preceding `depth_analysis` pass, or
computed here): the best-scored non-overlapping intervals removing `remove_blocks` (or `ratio` of all) blocks.
"""
from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field, model_validator
from safetensors.torch import save

from ..analysis import select_intervals
from ..analysis.intervals import select_min_total
from ..errors import RecipeError
from ..prune import check_intervals
from ._depth import DepthConfig, DepthPass, analysis_for, block_params, rebuild_lists, removal_count
from .base import register_pass

INTERVALS_FILE = "ppcl_intervals.safetensors"


class PPCLConfig(DepthConfig):
    intervals: Literal["auto"] | list[tuple[int, int]] = Field(
        "auto", description="auto (from the depth analysis) or [[start, end], ...]: global block indices in run "
                            "order (FLUX: double blocks first), inclusive")
    remove_blocks: int | None = Field(None, ge=1, description="with auto: blocks removed in total (an interval "
                                                              "[s, e] removes e - s)")
    ratio: float | None = Field(None, gt=0, lt=1, description="with auto: fraction of all blocks removed (rounded)")
    max_interval: int = Field(4, ge=2, description="with auto: longest interval, in blocks")
    selection: Literal["greedy", "min_total"] = Field(
        "greedy", description="with auto: greedy (best probe error per removed block first) or min_total (the "
                              "exact least sum of the intervals' probe errors)")
    keep_teacher_blocks: bool = Field(True, description=f"store each interval's teacher blocks in {INTERVALS_FILE} "
                                                        "so any subset of intervals can be unplugged at load time")

    @model_validator(mode="after")
    def _how_many(self):
        given = [k for k in ("remove_blocks", "ratio") if getattr(self, k) is not None]
        if self.intervals == "auto" and len(given) != 1:
            raise ValueError("intervals: auto needs exactly one of remove_blocks or ratio")
        if self.intervals != "auto" and given:
            raise ValueError(f"{given[0]} applies only with intervals: auto")
        return self


@register_pass
class PPCLDepth(DepthPass):
    name = "ppcl_depth"
    Config = PPCLConfig

    def apply(self, state) -> None:
        c = self.config
        refs = self.blocks(state)
        self.check_teacher(state)
        params_before = block_params(state.model, state.adapter)
        if c.intervals == "auto":
            k = removal_count(len(refs), c.ratio, c.remove_blocks, f"{self.name}.ratio")
            try:
                select = select_min_total if c.selection == "min_total" else select_intervals
                intervals = select(analysis_for(state, c.max_interval, state.progress), k)
            except ValueError as e:
                raise RecipeError(str(e), key=f"{self.name}.remove_blocks",
                                  hint="raise max_interval or remove fewer blocks") from None
        else:
            try:
                intervals = check_intervals(c.intervals, refs)
            except ValueError as e:
                raise RecipeError(str(e), key=f"{self.name}.intervals") from None
        names = [r.name for r in refs]
        students = [(s, e, copy.deepcopy(state.model.get_submodule(names[(s + e) // 2]))) for s, e in intervals]
        rows = self.distill_groups(state, refs, students)
        teacher_blocks = {f"{i}.{j}.{k}": t.detach().cpu().contiguous()
                          for i, (s, e) in enumerate(intervals) for j in range(e - s + 1)
                          for k, t in state.model.get_submodule(names[s + j]).state_dict().items()}
        positions = _positions(refs, intervals)
        counts = rebuild_lists(state, refs, {s: (e, m) for s, e, m in students})
        for i, ((s, e), (attr, pos)) in enumerate(zip(intervals, positions)):
            state.record({"op": "ppcl_interval", "module": f"{attr}.{pos}", "interval": i, "start": s, "end": e,
                          "replaced": names[s:e + 1]})
        if c.keep_teacher_blocks:
            state.files[INTERVALS_FILE] = save(teacher_blocks)
        e2e = self.end_to_end(state)
        summary = {"intervals": [list(iv) for iv in intervals], "removed_blocks": sum(e - s for s, e in intervals),
                   "blocks_left": counts, "block_param_fraction": round(block_params(state.model, state.adapter)
                                                                        / params_before, 4)}
        if e2e:
            summary["end_to_end"] = e2e
        state.add_pass_report(self.name, summary, [{"module": f"{r['first']}..{r['last']}", "method": self.name, **r}
                                                   for r in rows])


def _positions(refs, intervals) -> list[tuple[str, int]]:
    """Where each interval's block sits after the rebuild: (list attribute, index in that list)."""
    out = []
    for s, e in intervals:
        attr = refs[s].name.rpartition(".")[0]
        removed_before = sum(e0 - s0 for s0, e0 in intervals if e0 < s and refs[s0].name.startswith(attr + "."))
        out.append((attr, refs[s].index - removed_before))
    return out
