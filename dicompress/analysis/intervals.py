"""Candidate contiguous intervals of blocks, their score, and the choice of which to remove.

An interval [s, e] (inclusive block indices, never crossing from one block list into another) is later
replaced by ONE block (PPCL), so it removes e - s blocks; candidates have 2..max_interval blocks.

Score (lower = more removable): the interval's probe error (mean over streams of the held-out relative residual
of the best affine map input(s) -> output(e)) divided by the number of blocks it removes. It is a cost per
removed block: a long interval that is still nearly affine beats a short one of the same error, and intervals of
different lengths are compared on one scale by the greedy selection below.
"""
from __future__ import annotations


def block_list_of(name: str) -> str:
    """"single_transformer_blocks.7" -> "single_transformer_blocks"."""
    return name.rsplit(".", 1)[0]


def candidate_intervals(blocks: list[str], max_interval: int) -> list[tuple[int, int]]:
    """Every [s, e] with 2 <= e - s + 1 <= max_interval inside one block list, in (s, e) order."""
    if max_interval < 2:
        raise ValueError(f"max_interval must be >= 2 (an interval of one block removes nothing), got {max_interval}")
    out = []
    for s in range(len(blocks)):
        for e in range(s + 1, min(s + max_interval, len(blocks))):
            if block_list_of(blocks[e]) != block_list_of(blocks[s]):
                break
            out.append((s, e))
    return out


def interval_score(probe_error: float, start: int, end: int) -> float:
    """Cost per removed block (see the module docstring)."""
    return probe_error / (end - start)


def _reachable(n_blocks: int, intervals: list[tuple[int, int]], taken: set[int]) -> set[int]:
    """Every total number of removed blocks reachable with non-overlapping `intervals` on blocks not in `taken`."""
    ends: dict[int, list[int]] = {}
    for s, e in intervals:
        if not taken.intersection(range(s, e + 1)):
            ends.setdefault(e, []).append(s)
    reach = [{0}]                       # reach[p]: totals reachable using blocks < p
    for p in range(1, n_blocks + 1):
        r = set(reach[p - 1])
        for s in ends.get(p - 1, ()):
            r |= {k + (p - 1 - s) for k in reach[s]}
        reach.append(r)
    return reach[n_blocks]


def select_intervals(analysis, n_blocks_to_remove: int) -> list[tuple[int, int]]:
    """Non-overlapping intervals removing exactly `n_blocks_to_remove` blocks, taken greedily by score (best
    first). An interval is skipped when taking it would leave the exact total unreachable with what is left,
    so the greedy never paints itself into a corner. Returned sorted by start. ValueError when impossible."""
    if n_blocks_to_remove < 0:
        raise ValueError(f"n_blocks_to_remove must be >= 0, got {n_blocks_to_remove}")
    ranked = [(iv["start"], iv["end"]) for iv in sorted(analysis.intervals, key=lambda iv: iv["score"])]
    n = len(analysis.blocks)
    if n_blocks_to_remove not in _reachable(n, ranked, set()):
        most = max(_reachable(n, ranked, set()))
        raise ValueError(f"cannot remove exactly {n_blocks_to_remove} blocks with the candidate intervals (at most "
                         f"{most} of {n}: each interval of up to {_longest(ranked)} blocks is replaced by one block, "
                         "and intervals stay within one block list); lower the count or raise max_interval")
    chosen: list[tuple[int, int]] = []
    taken: set[int] = set()
    left = n_blocks_to_remove
    for s, e in ranked:
        if left == 0:
            break
        span = set(range(s, e + 1))
        if span & taken or e - s > left:
            continue
        if left - (e - s) in _reachable(n, ranked, taken | span):
            chosen.append((s, e))
            taken |= span
            left -= e - s
    assert left == 0, "the reachability check guarantees an exact cover"
    return sorted(chosen)


def select_min_total(analysis, n_blocks_to_remove: int) -> list[tuple[int, int]]:
    """Non-overlapping intervals removing exactly `n_blocks_to_remove` blocks with the least total probe error
    (the sum over the chosen intervals of each one's error): an exact dynamic programme over block positions,
    where `select_intervals` takes the best cost per removed block greedily (which favours one long interval
    over several short ones of the same total). Returned sorted by start. ValueError when impossible."""
    if n_blocks_to_remove < 0:
        raise ValueError(f"n_blocks_to_remove must be >= 0, got {n_blocks_to_remove}")
    n, r_max = len(analysis.blocks), n_blocks_to_remove
    ending: dict[int, list[tuple[int, float]]] = {}
    for iv in analysis.intervals:
        ending.setdefault(iv["end"], []).append((iv["start"], iv["score"] * (iv["end"] - iv["start"])))
    inf = float("inf")
    # best[p][r]: least error removing r blocks with intervals inside blocks < p; how[p][r]: the last interval
    best = [[0.0] + [inf] * r_max]
    how: list[list[tuple[int, int] | None]] = [[None] * (r_max + 1)]
    for p in range(1, n + 1):
        row, back = list(best[p - 1]), [None] * (r_max + 1)
        for s, err in ending.get(p - 1, ()):
            k = p - 1 - s
            for r in range(k, r_max + 1):
                if best[s][r - k] + err < row[r]:
                    row[r], back[r] = best[s][r - k] + err, (s, p - 1)
        best.append(row)
        how.append(back)
    if best[n][r_max] == inf:
        raise ValueError(f"cannot remove exactly {n_blocks_to_remove} blocks with the candidate intervals; "
                         "lower the count or raise max_interval")
    chosen, p, r = [], n, r_max
    while r > 0:
        while how[p][r] is None:          # block p-1 not in an interval at this optimum
            p -= 1
        s, e = how[p][r]
        chosen.append((s, e))
        r, p = r - (e - s), s
    return sorted(chosen)


def _longest(intervals: list[tuple[int, int]]) -> int:
    return max((e - s + 1 for s, e in intervals), default=1)
