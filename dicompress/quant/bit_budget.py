"""Bit widths per layer from a byte budget: a multiple-choice knapsack.

Each layer l takes one option k (a bit width) of cost c[l, k] (packed bytes) and error e[l, k] (its measured
output error at that width); the assignment minimises sum_l e[l, k_l] subject to sum_l c[l, k_l] <= budget.
`allocate` solves it exactly by dynamic programming over the budget's slack above the cheapest assignment,
in units of `unit` bytes: each option's extra cost over the layer's cheapest is rounded *up* to whole units
and the slack *down*, so the result always meets the budget in exact bytes (with unit = 1 it is the exact
optimum; coarser units, needed when the slack is billions of bytes, can only leave a little budget unused).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_RESOLUTION = 1 << 14   # DP cells over the slack: table of layers x cells int8 choices


@dataclass(frozen=True)
class Allocation:
    choice: list[int]      # option index per layer
    cost: int              # sum of the chosen costs (exact bytes)
    error: float           # sum of the chosen errors


def feasible_range(costs) -> tuple[int, int]:
    """(bytes of the cheapest assignment, bytes of the dearest): the budgets some assignment meets exactly."""
    c = np.asarray(costs, dtype=np.int64)
    return int(c.min(1).sum()), int(c.max(1).sum())


def allocate(costs, errors, budget: int, resolution: int = DEFAULT_RESOLUTION) -> Allocation:
    """The least-total-error choice of one option per layer with total cost <= budget.

    costs int [L, K] (bytes), errors float [L, K] (finite, >= 0; an option that must not be taken: inf).
    The slack (budget minus the cheapest assignment) is cut into at most `resolution` units of equal bytes.
    ValueError when even the cheapest assignment exceeds the budget."""
    c = np.asarray(costs, dtype=np.int64)
    e = np.asarray(errors, dtype=np.float64)
    if c.ndim != 2 or c.shape != e.shape or c.shape[1] == 0:
        raise ValueError(f"costs {c.shape} and errors {e.shape} must both be [layers, options]")
    if (c < 0).any() or np.isnan(e).any():
        raise ValueError("costs must be >= 0 and errors not NaN")
    lo, _ = feasible_range(c)
    if budget < lo:
        raise ValueError(f"budget {budget} bytes is below the cheapest assignment ({lo} bytes)")
    base = c.min(1, keepdims=True)
    slack = int(budget) - lo
    unit = max(1, math.ceil(slack / resolution)) if slack else 1
    extra = -(-(c - base) // unit)                      # ceil: the rounded costs never undercount
    cells = slack // unit
    # best[s] = least error of the layers so far with rounded extra cost exactly <= s
    best = np.zeros(cells + 1)
    pick = np.empty((len(c), cells + 1), dtype=np.int16)
    for layer in range(len(c)):
        cand = np.full((c.shape[1], cells + 1), np.inf)
        for k in range(c.shape[1]):
            x = int(extra[layer, k])
            if x <= cells:
                cand[k, x:] = best[:cells + 1 - x] + e[layer, k]
        pick[layer] = cand.argmin(0)
        best = cand[pick[layer], np.arange(cells + 1)]
    if not np.isfinite(best[cells]):
        raise ValueError("every assignment within the budget takes an option of infinite error")
    choice, s = [0] * len(c), cells
    for layer in range(len(c) - 1, -1, -1):
        k = int(pick[layer, s])
        choice[layer] = k
        s -= int(extra[layer, k])
    return Allocation(choice, int(c[np.arange(len(c)), choice].sum()), float(e[np.arange(len(c)), choice].sum()))
