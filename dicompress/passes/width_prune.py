"""`width_prune` pass: remove whole attention heads and FFN neurons of the selected blocks, scored by a
torch-pruning importance (magnitude | taylor | random), to a parameter budget (uniform per block or global).

The surgery is `prune.width.prune_width` (one manifest entry `width` per block; the artifact rebuilds the
narrower blocks at load time), the allocation `prune.width_plan`, the scores `prune.width_importance`. What
every width method shares (keys, order rules, the budget checked before any work, allocation, removal, report)
is `WidthBudgetConfig` / `WidthPass`, which `mask_prune` (learned differentiable masks) builds on too.
"""
from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..errors import RecipeError
from ..prune.width import block_shape, layout_for, prune_width, select_blocks
from ..prune.width_importance import unit_scores
from ..prune.width_plan import (WidthBudgetError, check_global, plan_global, plan_uniform, snap_widths,
                                uniform_counts)
from ..quant.hadamard import can_hadamard
from .base import Pass, PassConfig, first_rewrite, register_pass

# structural passes that swap the FFN modules for others (projectors, experts): width pruning cannot follow them
REPLACES_FFNS = ("ppcl_width", "dense2moe")


class WidthBudgetConfig(PassConfig):
    """The keys every width method shares: the budget, which units and blocks, how kept widths are rounded."""
    ratio: float = Field(gt=0, lt=1, description="fraction of the selected blocks' parameters removed")
    allocation: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: every block loses `ratio` of its parameters | global: units of all blocks "
                               "ranked together (scores normalised by their block's and kind's mean)")
    heads: bool = Field(True, description="prune attention heads")
    ffn: bool = Field(True, description="prune FFN hidden neurons")
    text_stream: bool = Field(True, description="also prune the text stream's FFN of dual-stream blocks (heads are "
                                                "shared by both streams: joint attention)")
    include: tuple[str, ...] | None = Field(None, description="block names (fnmatch); null = every block")
    keep: tuple[str, ...] = Field((), description="block names left whole (fnmatch)")
    widths: Literal["any", "hadamard"] = Field(
        "any", description="hadamard: move each block's kept counts to the nearest ones whose layer input widths "
                           "have a Hadamard matrix (attention output, FFN hidden, FLUX single proj_out input), so a "
                           "later `ars` can rotate every pruned linear")

    @model_validator(mode="after")
    def _something(self):
        if not (self.heads or self.ffn):
            raise ValueError("heads and ffn are both false: nothing to prune")
        return self


class WidthPruneConfig(WidthBudgetConfig):
    importance: Literal["magnitude", "taylor", "random"] = Field(
        "magnitude", description="torch-pruning importance: magnitude (group L2) | taylor (|w * grad| of the output "
                                 "along random directions, on calibration model inputs) | random")
    seed: int = Field(0, ge=0, description="random importance, and the Taylor rows and probe directions")
    taylor_batch: int = Field(16, ge=1, description="taylor: calibration rows per probe")
    taylor_probes: int = Field(4, ge=1, description="taylor: random output directions (one backward each)")
    dependency_graph: bool = Field(True, description="take the FFN groups torch-pruning's DependencyGraph finds "
                                                     "exactly (dual-stream FFNs) from it")


class WidthPass(Pass):
    """What every width method shares: order rules, the budget checked on the model's shapes before any work,
    the allocation of a budget from unit scores, the removal (`prune_width`, manifest entries) and the report.
    A method supplies the scores (or the keep indices) in `apply`."""
    changes_structure = True
    # global allocation divides scores by their block's and kind's mean (importances of different scales)
    normalise_scores: ClassVar[bool] = True

    def check(self, previous: list[Pass]) -> list[tuple[str, str]]:
        for i, p in enumerate(previous):
            if p.name in REPLACES_FFNS:
                return [("", f"runs after passes[{i}].{p.name}, which replaces FFN modules (no up / down projection "
                             "left to prune); put width pruning first")]
        found = first_rewrite(previous)
        if found:
            i, p = found
            return [("", f"runs after passes[{i}].{p.name}, which rewrites linears; width pruning removes rows "
                         "and columns of plain linears, so put it before quantization, smoothing, rotation and "
                         "activation quantization")]
        return []

    def check_model(self, model, adapter) -> list[tuple[str, str]]:
        """The budget against the model's shapes (a meta model is enough): no block may lose every head or every
        neuron of an FFN. Runs before any work."""
        try:
            self._plan_shapes(model, adapter)
        except (WidthBudgetError, RecipeError) as e:
            return [("ratio" if isinstance(e, WidthBudgetError) else "include", str(e.args[0]))]
        except ValueError as e:      # a block whose layout is not the family's (e.g. FFNs replaced by an artifact)
            return [("", str(e))]
        return []

    # -- steps --------------------------------------------------------------------------------------------
    def _refs(self, model, adapter):
        c = self.config
        include = c.include if c.include is not None else tuple(f"{attr}.*" for attr, _ in adapter.block_lists)
        refs = select_blocks(adapter.blocks(model), include, c.keep)
        if not refs:
            raise RecipeError(f"no block matches include {list(include)} minus keep {list(c.keep)}",
                              key=f"{self.name}.include", hint="block names look like transformer_blocks.0, "
                                                              "single_transformer_blocks.3")
        return refs

    def _ffns(self, adapter, stream) -> tuple[str, ...]:
        if not self.config.ffn:
            return ()
        return tuple(f.key for f in layout_for(adapter, stream).ffns if self.config.text_stream or not f.text)

    def _plan_shapes(self, model, adapter):
        c = self.config
        refs = self._refs(model, adapter)
        shapes = {r.name: block_shape(model.get_submodule(r.name), layout_for(adapter, r.stream)) for r in refs}
        ffns = {r.name: self._ffns(adapter, r.stream) for r in refs}
        if c.allocation == "uniform":
            for r in refs:
                uniform_counts(r.name, shapes[r.name], c.ratio, c.heads, ffns[r.name])
        else:
            all_ffns = tuple(sorted({k for v in ffns.values() for k in v}))
            check_global(shapes, c.ratio, c.heads, all_ffns)
        return refs, shapes, ffns

    def _plan(self, adapter, refs, shapes, ffns, scores, keep=None):
        """Keep indices for the budget from `scores` (or `keep` as given), moved to Hadamard widths if asked."""
        c = self.config
        if keep is None and c.allocation == "uniform":
            keep = {}
            for r in refs:
                keep.update(plan_uniform({r.name: shapes[r.name]}, scores, c.ratio, c.heads, ffns[r.name]))
        elif keep is None:
            all_ffns = tuple(sorted({k for v in ffns.values() for k in v}))
            keep = plan_global(shapes, scores, c.ratio, c.heads, all_ffns, normalise=self.normalise_scores)
        if c.widths == "hadamard":
            joint = {r.name: tuple(f.key for f in layout_for(adapter, r.stream).ffns if f.after_heads) for r in refs}
            keep = snap_widths(shapes, keep, scores, can_hadamard, joint)
        return keep

    def _budget(self, model, adapter):
        """`_plan_shapes`, a budget no setting can meet as a RecipeError."""
        try:
            return self._plan_shapes(model, adapter)
        except WidthBudgetError as e:
            raise RecipeError(str(e.args[0]), key=f"{self.name}.ratio",
                              hint="lower the ratio, or prune both heads and FFNs (heads: true, ffn: true)") from None

    def _plan_or_error(self, adapter, refs, shapes, ffns, scores, keep=None):
        try:
            return self._plan(adapter, refs, shapes, ffns, scores, keep)
        except WidthBudgetError as e:
            raise RecipeError(str(e.args[0]), key=f"{self.name}.widths", hint="set `widths: any`") from None

    @staticmethod
    def _block_params(model, adapter) -> int:
        return sum(p.numel() for attr, _ in adapter.block_lists for p in getattr(model, attr).parameters())

    def _remove(self, state, keep) -> None:
        """Remove what `keep` drops (torch-pruning's pruning functions) and record the manifest entries."""
        model = state.model
        entries = prune_width(model, state.adapter, keep)
        # A model read by diffusers' from_pretrained holds zero-copy views into the mmapped checkpoint at unaligned
        # offsets, where CPU GEMMs round differently (1 ulp) from aligned memory; the artifact's loader realigns
        # them. Realign here too, so the model in memory computes bit for bit what the artifact will (measured on
        # the embedded model: 104 unaligned parameters, 1.4e-6 at the output, 0.0155 once act_quant rounds it).
        from ..io.diffusers_plugin import _realign_cpu_tensors   # lazy: diffusers' quantizers take seconds to import
        _realign_cpu_tensors(model)
        for e in entries:
            state.record(e)

    def _report(self, state, refs, shapes, keep, every, extra: dict) -> None:
        """Rows per block (kept heads and neurons, parameters before / after) and the pass summary (`extra` first)."""
        model, adapter = state.model, state.adapter
        rows = []
        for r in refs:
            s, k = shapes[r.name], keep[r.name]
            after = sum(p.numel() for p in model.get_submodule(r.name).parameters())
            row = {"module": r.name, "method": self.name, "stream": r.stream,
                   "heads": f"{len(k.heads) if k.heads is not None else s.heads}/{s.heads}",
                   "kept_heads": k.heads if k.heads is not None else list(range(s.heads)),
                   "params_before": s.params, "params_after": after,
                   "removed_fraction": round(1 - after / s.params, 4)}
            for key, n in s.ffn.items():
                row[key] = f"{len(k.ffn[key]) if key in k.ffn else n}/{n}"
            rows.append(row)
        before = sum(s.params for s in shapes.values())
        after_sel = sum(r["params_after"] for r in rows)
        summary = {**extra, "blocks_pruned": len(refs),
                   "blocks_left": {attr: len(getattr(model, attr)) for attr, _ in adapter.block_lists},
                   "removed_fraction": round(1 - after_sel / before, 4),
                   "block_param_fraction": round(self._block_params(model, adapter) / every, 4),
                   "heads_removed": sum(s.heads - len(keep[n].heads) for n, s in shapes.items()
                                        if keep[n].heads is not None),
                   "neurons_removed": sum(s.ffn[key] - len(v) for n, s in shapes.items()
                                          for key, v in keep[n].ffn.items())}
        state.add_pass_report(self.name, summary, rows)


@register_pass
class WidthPrune(WidthPass):
    name = "width_prune"
    Config = WidthPruneConfig

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        # Taylor reads the calibration's model inputs (no per-block inputs)
        self.needs_calibration = self.needs_model_inputs = self.config.importance == "taylor"

    def apply(self, state) -> None:
        c = self.config
        model, adapter = state.model, state.adapter
        refs, shapes, ffns = self._budget(model, adapter)
        inputs = None
        if c.importance == "taylor":
            store = self.calibration(state)
            inputs = store.model_inputs()
        t = time.perf_counter()
        scores, info = unit_scores(model, adapter, refs, c.importance, seed=c.seed, model_inputs=inputs,
                                   batch=c.taylor_batch, probes=c.taylor_probes,
                                   use_dependency_graph=c.dependency_graph)
        t_scores = time.perf_counter() - t
        keep = self._plan_or_error(adapter, refs, shapes, ffns, scores)
        every = self._block_params(model, adapter)
        self._remove(state, keep)
        summary = {"importance": c.importance, "allocation": c.allocation,
                   "dependency_graph_groups": sum(len(v) for v in info["traced"].values()),
                   "scores_seconds": round(t_scores, 2)}
        if c.importance == "taylor":
            summary["taylor"] = {"rows_per_probe": info["batch"], "probes": info["probes"]}
        self._report(state, refs, shapes, keep, every, summary)
