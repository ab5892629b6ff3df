"""Which blocks a depth pass removes, as pure index logic over the adapter's block order.

Blocks are numbered globally in run order (FLUX: double blocks 0..D-1, then single blocks D..D+S-1), as
`ArchAdapter.blocks` lists them and as the depth analysis reports them. A group [s, e] is a contiguous run
inside ONE block list (a double and a single block never merge: they have different classes), that one
student block replaces.
"""
from __future__ import annotations

import random as _random


def list_of(refs) -> list[str]:
    """The block-list attribute of every global index (refs: `ArchAdapter.blocks(model)`)."""
    return [r.name.rpartition(".")[0] for r in refs]


def check_intervals(intervals, refs) -> list[tuple[int, int]]:
    """Validate [s, e] pairs (inclusive global indices): in range, s < e, inside one block list, not
    overlapping. Returns them sorted; ValueError names the offending pair."""
    n, lists = len(refs), list_of(refs)
    out = []
    for iv in intervals:
        s, e = (int(v) for v in iv)
        if not 0 <= s < e < n:
            raise ValueError(f"interval [{s}, {e}] must satisfy 0 <= start < end < {n} (the model has {n} blocks; "
                             "an interval of one block removes nothing)")
        if lists[s] != lists[e]:
            raise ValueError(f"interval [{s}, {e}] crosses from {refs[s].name} to {refs[e].name}: an interval "
                             "must stay inside one block list")
        out.append((s, e))
    out.sort()
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 <= e0:
            raise ValueError(f"intervals [{s0}, {e0}] and [{s1}, {e1}] overlap")
    return out


def amber_groups(refs, removed: set[int]) -> list[tuple[int, int, int]]:
    """(kept, start, end) for every kept block that absorbs removed neighbours: each run of removed blocks
    joins the kept block just before it in the same list (just after it when the run opens the list), so
    every group is contiguous and the kept block's student learns the whole group's map. A run in a list
    with no kept block at all has no partner and is simply dropped."""
    lists = list_of(refs)
    n = len(refs)
    groups: dict[int, list[int]] = {}
    i = 0
    while i < n:
        if i not in removed:
            i += 1
            continue
        j = i
        while j + 1 < n and j + 1 in removed and lists[j + 1] == lists[i]:
            j += 1
        before = i - 1 if i > 0 and lists[i - 1] == lists[i] else None
        after = j + 1 if j + 1 < n and lists[j + 1] == lists[i] else None
        kept = before if before is not None else after
        if kept is not None:
            groups.setdefault(kept, [kept]).extend(range(i, j + 1))
        i = j + 1
    return sorted((k, min(m), max(m)) for k, m in groups.items())


def random_intervals(refs, n_remove: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """Random non-overlapping intervals removing exactly `n_remove` blocks (the `random` baseline of the
    pruning benchmark: the same budget as the analysis' choice, without the analysis)."""
    rng = _random.Random(seed)
    lists = list_of(refs)
    for _ in range(10_000):
        taken: list[tuple[int, int]] = []
        left = n_remove
        for _ in range(100):
            if left == 0:
                return sorted(taken)
            length = rng.randint(1, min(max_len - 1, left))          # blocks removed by this interval
            s = rng.randrange(0, len(refs) - length)
            e = s + length
            if lists[s] != lists[e] or any(not (e < a or s > b) for a, b in taken):
                continue
            taken.append((s, e))
            left -= length
    raise ValueError(f"could not draw random intervals removing {n_remove} blocks")
