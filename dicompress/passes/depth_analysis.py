"""`depth_analysis` pass: measure which blocks and contiguous intervals could be removed; changes nothing.

What it measures is in analysis/depth.py (PPCL CKA trajectory and interval probes, Amber skip-one importance
per timestep bin). It leaves, for the report and for later passes:
    report section "depth_analysis"  the analysis as JSON (`DepthAnalysis.from_report` rebuilds it)
    state.files                      {"depth_analysis.png": PNG bytes} when `plot` (written into the artifact)
and one layer row per block (importance, CKA per stream).
"""
from __future__ import annotations

import io

from pydantic import Field

from ..analysis import analyze_depth, interval_label, plot_depth
from .base import Pass, PassConfig, register_pass

PLOT_FILE = "depth_analysis.png"


class DepthAnalysisConfig(PassConfig):
    max_interval: int = Field(4, ge=2, description="longest candidate interval, in blocks (each is later "
                                                   "replaced by one block)")
    timestep_bins: int = Field(4, ge=1, description="equal-count timestep bins of the importance")
    max_tokens: int = Field(4096, ge=16, description="tokens per stream sampled for CKA and the probes")
    plot: bool = Field(True, description=f"draw {PLOT_FILE} (CKA trajectory, importance per timestep bin)")


def _rows(analysis) -> list[dict]:
    rank = {b: i for i, b in enumerate(analysis.ranked_blocks())}
    rows = []
    for i, imp in enumerate(analysis.importance):
        row = {"module": imp["block"], "method": "depth_analysis", "importance": round(imp["importance"], 6),
               "importance_rank": rank[imp["block"]]}
        row.update({f"cka_{st}": round(analysis.cka[st][i], 5) for st in analysis.streams})
        rows.append(row)
    return rows


def _summary(analysis, top: int = 3) -> dict:
    best = analysis.intervals[:top]
    return {"blocks": len(analysis.blocks), "rows": analysis.rows,
            "least_important": ", ".join(analysis.ranked_blocks()[:top]),
            "best_intervals": ", ".join(f"{interval_label(iv)} ({iv['probe_error']['combined']:.3g})" for iv in best)}


@register_pass
class DepthAnalysisPass(Pass):
    name = "depth_analysis"
    Config = DepthAnalysisConfig
    needs_calibration = True
    needs_block_inputs = True

    def apply(self, state) -> None:
        c = self.config
        analysis = analyze_depth(state.model, state.adapter, self.calibration(state), max_interval=c.max_interval,
                                 timestep_bins=c.timestep_bins, max_tokens=c.max_tokens, progress=state.progress)
        state.add_section("depth_analysis", analysis.to_report())
        if c.plot:
            buf = io.BytesIO()
            plot_depth(analysis, buf)
            state.files[PLOT_FILE] = buf.getvalue()
        state.add_pass_report(self.name, _summary(analysis), _rows(analysis))
