"""`hybrid_stream` pass (Amber-Image): convert the deepest dual-stream blocks into single-stream blocks.

Each converted block is the architecture's own single-stream block (FLUX: a real
`FluxSingleTransformerBlock`, so the saved config's `num_layers` / `num_single_layers` describe the result
and diffusers builds it unaided) initialised from the dual-stream block's image branch
(`ArchAdapter.single_from_double`), then trained layer-wise on that block's captured teacher input and
output, both streams; then, optionally, end-to-end. Only the deepest dual-stream blocks convert: FLUX runs
every double block before the single ones, so converting block i < last would reorder the computation.
"""
from __future__ import annotations

from pydantic import Field

from ..errors import ModelError, RecipeError
from ..nn.surgery import set_block_list
from ._depth import DepthConfig, DepthPass, block_params
from .base import register_pass


class HybridConfig(DepthConfig):
    convert: int = Field(ge=1, description="how many of the deepest dual-stream blocks become single-stream")


@register_pass
class HybridStream(DepthPass):
    name = "hybrid_stream"
    Config = HybridConfig

    def apply(self, state) -> None:
        c, a = self.config, state.adapter
        streams = dict(a.block_lists)
        double = next((attr for attr, kind in a.block_lists if kind == "double"), None)
        single = next((attr for attr, kind in a.block_lists if kind == "single"), None)
        if double is None or single is None:
            raise ModelError(f"hybrid_stream: {type(state.model).__name__} has no single-stream block list "
                             f"(block lists: {streams})", hint="hybrid_stream supports FLUX-style models")
        refs = self.blocks(state)
        self.check_teacher(state)
        doubles = [i for i, r in enumerate(refs) if r.stream == "double"]
        if c.convert > len(doubles):
            raise RecipeError(f"convert {c.convert} exceeds the model's {len(doubles)} dual-stream blocks",
                              key=f"{self.name}.convert")
        params_before = block_params(state.model, a)
        chosen = doubles[-c.convert:]
        try:
            students = [(i, i, a.single_from_double(state.model, state.model.get_submodule(refs[i].name)))
                        for i in chosen]
        except NotImplementedError as e:
            raise ModelError(f"hybrid_stream: {e}") from None
        rows = self.distill_groups(state, refs, students)
        kept = [state.model.get_submodule(refs[i].name) for i in doubles if i not in chosen]
        singles = [m for _, _, m in students] + list(getattr(state.model, single))
        set_block_list(state.model, a, double, kept)
        set_block_list(state.model, a, single, singles)
        for j, i in enumerate(chosen):
            state.record({"op": "hybrid_stream", "module": f"{single}.{j}", "from": refs[i].name})
        e2e = self.end_to_end(state)
        summary = {"converted": [refs[i].name for i in chosen],
                   "blocks_left": {double: len(kept), single: len(singles)},
                   "block_param_fraction": round(block_params(state.model, a) / params_before, 4)}
        if e2e:
            summary["end_to_end"] = e2e
        state.add_pass_report(self.name, summary, [{"module": r["first"], "method": self.name, **r} for r in rows])
