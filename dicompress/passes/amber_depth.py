"""`amber_depth` pass (Amber-Image): remove the least important blocks, rebuild the kept neighbours.

Importance is the depth analysis' skip-one output change aggregated over timestep bins (a preceding
`depth_analysis` pass, or computed here). The lowest-importance blocks are removed to the target; each run
of removed blocks joins the kept block before it in the same list (after it when the run opens the list),
that kept block is re-initialised as the mean of its own and the removed blocks' parameters (local weight
averaging), then trained layer-wise on the teacher's input of the group -> the teacher's output of the
group; then, optionally, end-to-end distillation of the whole model.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from ..prune import amber_groups, average_parameters_
from ._depth import DepthConfig, DepthPass, analysis_for, block_params, rebuild_lists, removal_count
from .base import register_pass


class AmberConfig(DepthConfig):
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of all blocks removed (rounded)")
    remove_blocks: int | None = Field(None, ge=1, description="blocks removed (instead of ratio)")
    averaging: bool = Field(True, description="re-initialise each kept block as the mean of itself and the blocks "
                                              "it absorbs (false: keep its own weights)")

    @model_validator(mode="after")
    def _how_many(self):
        if (self.ratio is None) == (self.remove_blocks is None):
            raise ValueError("give exactly one of ratio or remove_blocks")
        return self


@register_pass
class AmberDepth(DepthPass):
    name = "amber_depth"
    Config = AmberConfig

    def apply(self, state) -> None:
        c = self.config
        refs = self.blocks(state)
        self.check_teacher(state)
        names = [r.name for r in refs]
        params_before = block_params(state.model, state.adapter)
        k = removal_count(len(refs), c.ratio, c.remove_blocks, f"{self.name}.ratio")
        analysis = analysis_for(state, 4, state.progress)
        ranked = analysis.ranked_blocks()                       # least important first
        removed = {names.index(b) for b in ranked[:k]}
        groups = amber_groups(refs, removed)
        students = []
        for kept, s, e in groups:
            block = state.model.get_submodule(names[kept])
            if c.averaging:
                average_parameters_(block, [state.model.get_submodule(names[i]) for i in range(s, e + 1) if i != kept])
            students.append((s, e, block))
        rows = self.distill_groups(state, refs, students)
        replace = {s: (e, m) for s, e, m in students}
        grouped = {i for _, s, e in groups for i in range(s, e + 1)}
        replace.update({i: (i, None) for i in removed - grouped})   # a list that lost every block
        counts = rebuild_lists(state, refs, replace)
        for i in sorted(removed):
            state.record({"op": "remove_block", "module": names[i]})
        e2e = self.end_to_end(state)
        summary = {"removed": [names[i] for i in sorted(removed)], "removed_blocks": len(removed),
                   "blocks_left": counts,
                   "block_param_fraction": round(block_params(state.model, state.adapter) / params_before, 4)}
        if e2e:
            summary["end_to_end"] = e2e
        state.add_pass_report(self.name, summary, [{"module": f"{r['first']}..{r['last']}", "method": self.name, **r}
                                                   for r in rows])
