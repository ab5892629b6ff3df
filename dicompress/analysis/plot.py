"""PNG of a depth analysis: the CKA trajectory per stream (and its first difference), and the skip-one
importance of every block per timestep bin (a heatmap, log colour scale). matplotlib is imported lazily."""
from __future__ import annotations

import math


def _boundaries(blocks: list[str]) -> list[float]:
    """x positions between two block lists (e.g. double -> single stream)."""
    lists = [b.rsplit(".", 1)[0] for b in blocks]
    return [i - 0.5 for i in range(1, len(lists)) if lists[i] != lists[i - 1]]


def _short(name: str) -> str:
    head, _, idx = name.rpartition(".")
    return f"{'s' if head.startswith('single') else 'd'}{idx}" if head.endswith("transformer_blocks") else name


def plot_depth(analysis, path) -> None:
    """Write the figure to `path` (a file name or a binary file object) as PNG."""
    # lazy: matplotlib takes about a second to load and only plotting needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(analysis.blocks)
    x = list(range(n))
    fig = Figure(figsize=(max(6.0, 0.45 * n + 2), 8.5), layout="constrained")
    FigureCanvasAgg(fig)                 # the Agg canvas, without pyplot or a global backend switch
    ax_cka, ax_diff, ax_imp = fig.subplots(3, 1, sharex=True, height_ratios=[2, 1, 2])
    for st in analysis.streams:
        ax_cka.plot(x, analysis.cka[st], marker="o", label=st)
        ax_diff.plot(x, analysis.cka_diff[st], marker=".", label=st)
    ax_cka.set_ylabel("CKA(input, output)")
    ax_cka.set_title("block similarity (linear CKA) along depth")
    ax_cka.legend(loc="lower left")
    ax_diff.axhline(0.0, color="grey", lw=0.8)
    ax_diff.set_ylabel("first difference")

    grid = [[r["per_bin"][b] for r in analysis.importance] for b in range(len(analysis.timestep_bins))]
    finite = [v for row in grid for v in row if v > 0 and math.isfinite(v)]
    floor = min(finite) if finite else 1e-12
    logged = [[math.log10(max(v, floor)) for v in row] for row in grid]
    im = ax_imp.imshow(logged, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax_imp, label="log10 relative MSE when skipped")
    ax_imp.set_yticks(range(len(analysis.timestep_bins)),
                      [f"t {lo:.2f}-{hi:.2f}" for lo, hi in analysis.timestep_bins])
    ax_imp.set_title("importance per timestep bin (skip-one ablation)")
    ax_imp.set_xticks(x, [_short(b) for b in analysis.blocks], rotation=90 if n > 24 else 0)
    ax_imp.set_xlabel("block")
    for ax in (ax_cka, ax_diff, ax_imp):
        for b in _boundaries(analysis.blocks):
            ax.axvline(b, color="red", ls="--", lw=0.8)
    fig.savefig(path, format="png", dpi=100)
