"""Model analyses that guide structural passes (depth pruning): similarity along depth, interval probes,
block importance. Passes import from here; nothing here changes a model."""
from .depth import (
    STREAMS,
    DepthAnalysis,
    analyze_depth,
    bin_by_timestep,
    interval_label,
)
from .intervals import candidate_intervals, interval_score, select_intervals
from .plot import plot_depth
from .similarity import linear_cka, probe_error

__all__ = ["STREAMS", "DepthAnalysis", "analyze_depth", "bin_by_timestep", "candidate_intervals", "interval_label",
           "interval_score", "linear_cka", "plot_depth", "probe_error", "select_intervals"]
