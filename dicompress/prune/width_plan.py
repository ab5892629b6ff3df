"""How many heads and FFN neurons each block keeps, and which: pure logic over block shapes and unit scores.

A budget is a fraction `ratio` of the selected blocks' parameters. Units cost what they hold (`BlockShape`:
a head's q/k/v rows and output columns, a neuron's up row and down column), so heads and neurons are traded in
parameters, not in counts.

- `uniform`: every selected block loses `ratio` of its own parameters: the same fraction f of its heads and of
  its neurons (f = ratio x block params / prunable params), heads rounded to whole heads, then the neurons
  absorb the rounding so the block's removed parameters match its budget to within one neuron per FFN.
- `global`: units of all selected blocks compete: each score is divided by the mean score of its kind in its
  block (torch-pruning's `normalizer="mean"`, so heads, neurons and blocks compare: an average unit of any
  kind scores 1), and units go lowest first until the removed parameters meet the budget; a block keeps at
  least one head and one neuron per FFN. (Dividing by the unit's parameter cost as well would rank every head,
  which holds ~100x a neuron's parameters, below every neuron.)
Either way the least important units of each kind in a block go first.
"""
from __future__ import annotations

import torch

from .width import BlockKeep, BlockShape


class WidthBudgetError(ValueError):
    """The ratio cannot be met with at least one head and one neuron of every FFN left in every block."""


def kinds(shape: BlockShape, heads: bool, ffns: tuple[str, ...]) -> list[str]:
    return (["heads"] if heads else []) + [k for k in ffns if k in shape.ffn]


def uniform_counts(name: str, shape: BlockShape, ratio: float, heads: bool, ffns: tuple[str, ...]) -> dict[str, int]:
    """Units removed per kind in one block under `uniform`; WidthBudgetError when the block would lose every head or
    every neuron of an FFN."""
    ffns = tuple(k for k in ffns if k in shape.ffn)
    budget = ratio * shape.params
    prunable = shape.prunable(heads, ffns)
    if prunable == 0:
        raise WidthBudgetError(f"{name}: nothing to prune (heads and every FFN are excluded)")
    f = budget / prunable
    out: dict[str, int] = {}
    spent = 0
    if heads:
        out["heads"] = min(shape.heads, round(f * shape.heads)) if ffns else min(shape.heads,
                                                                                round(budget / shape.head_params))
        spent = out["heads"] * shape.head_params
        if out["heads"] >= shape.heads:
            raise WidthBudgetError(f"{name}: ratio {ratio} removes {out['heads']} of its {shape.heads} heads "
                                   f"({f:.0%} of its prunable width); at least one head must stay")
    rest = max(0.0, budget - spent)
    total = sum(shape.ffn[k] * shape.neuron_params[k] for k in ffns)
    for k in ffns:
        share = rest * shape.ffn[k] * shape.neuron_params[k] / total
        out[k] = round(share / shape.neuron_params[k])
        if out[k] >= shape.ffn[k]:
            raise WidthBudgetError(f"{name}: ratio {ratio} removes {out[k]} of the {shape.ffn[k]} neurons of its {k} "
                                   "FFN; at least one neuron must stay")
    return out


def keep_lowest_removed(scores: torch.Tensor, n_remove: int) -> list[int]:
    """Indices kept when the `n_remove` lowest-scoring units go (ties: the lower index goes first), sorted."""
    n = scores.numel()
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return sorted(order[n_remove:])


def plan_uniform(shapes: dict[str, BlockShape], scores: dict[str, dict[str, torch.Tensor]], ratio: float,
                 heads: bool, ffns: tuple[str, ...]) -> dict[str, BlockKeep]:
    keep = {}
    for name, shape in shapes.items():
        counts = uniform_counts(name, shape, ratio, heads, ffns)
        k = BlockKeep()
        for kind, n in counts.items():
            k.set(kind, keep_lowest_removed(scores[name][kind], n))
        keep[name] = k
    return keep


def check_global(shapes: dict[str, BlockShape], ratio: float, heads: bool, ffns: tuple[str, ...]) -> None:
    """The budget fits when every block keeps one head and one neuron of every pruned FFN."""
    budget = ratio * sum(s.params for s in shapes.values())
    room = 0
    for s in shapes.values():
        ks = kinds(s, heads, ffns)
        room += sum((s.heads - 1) * s.head_params if k == "heads" else (s.ffn[k] - 1) * s.neuron_params[k] for k in ks)
    if budget > room:
        raise WidthBudgetError(f"ratio {ratio} asks for {int(budget)} parameters, but only {room} can go while every "
                               "block keeps one head and one neuron per FFN")


def plan_global(shapes: dict[str, BlockShape], scores: dict[str, dict[str, torch.Tensor]], ratio: float,
                heads: bool, ffns: tuple[str, ...], normalise: bool = True) -> dict[str, BlockKeep]:
    """`normalise`: divide by the mean of the unit's block and kind (importances of different scales); False:
    rank the scores as they are (scores already comparable across kinds and blocks, e.g. learned mask logits)."""
    check_global(shapes, ratio, heads, ffns)
    budget = ratio * sum(s.params for s in shapes.values())
    units = []                     # (normalised score, block, kind, index, cost)
    for name, s in shapes.items():
        for kind in kinds(s, heads, ffns):
            sc = scores[name][kind].double()
            mean = sc.mean()
            norm = sc if not normalise else sc / mean if mean > 0 else torch.zeros_like(sc)
            cost = s.head_params if kind == "heads" else s.neuron_params[kind]
            units += [(float(norm[i]), name, kind, i, cost) for i in range(sc.numel())]
    units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    left = {(name, kind): (s.heads if kind == "heads" else s.ffn[kind])
            for name, s in shapes.items() for kind in kinds(s, heads, ffns)}
    removed: dict[tuple[str, str], set[int]] = {key: set() for key in left}
    spent = 0
    for _, name, kind, i, cost in units:
        if spent >= budget:
            break
        if left[(name, kind)] <= 1:
            continue
        removed[(name, kind)].add(i)
        left[(name, kind)] -= 1
        spent += cost
    keep = {}
    for name, s in shapes.items():
        k = BlockKeep()
        for kind in kinds(s, heads, ffns):
            n = s.heads if kind == "heads" else s.ffn[kind]
            k.set(kind, sorted(set(range(n)) - removed[(name, kind)]))
        keep[name] = k
    return keep


def _nearest(target: int, hi: int, ok) -> int | None:
    """The count in 1..hi nearest `target` that `ok` accepts (ties: the smaller, i.e. more removed)."""
    for d in range(hi):
        for c in (target - d, target + d):
            if 1 <= c <= hi and ok(c):
                return c
    return None


def snap_widths(shapes: dict[str, BlockShape], keep: dict[str, BlockKeep], scores: dict[str, dict[str, torch.Tensor]],
                width_ok, after_heads: dict[str, tuple[str, ...]] | None = None) -> dict[str, BlockKeep]:
    """Move every block's kept counts to the nearest ones whose layer input widths `width_ok(n)` accepts (e.g. a
    Hadamard order, so a later rotation pass can rotate them): the attention output (heads x head_dim), each
    FFN's hidden width, and for FFNs in `after_heads[block]` the concatenation heads x head_dim + hidden (FLUX
    single blocks' proj_out). The units kept are again the highest-scoring ones. WidthBudgetError if none fits."""
    after_heads = after_heads or {}
    out = {}
    for name, s in shapes.items():
        k = keep[name]
        hd = s.head_dim
        h = len(k.heads) if k.heads is not None else s.heads
        h2 = _nearest(h, s.heads, lambda c: width_ok(c * hd))
        if h2 is None:
            raise WidthBudgetError(f"{name}: no head count gives an attention width the later passes accept")
        new = BlockKeep(keep_lowest_removed(scores[name]["heads"], s.heads - h2)
                        if (k.heads is not None or h2 != s.heads) else None)
        for key, n_full in s.ffn.items():
            n = len(k.ffn[key]) if key in k.ffn else n_full
            joint = key in after_heads.get(name, ())
            n2 = _nearest(n, n_full, lambda c: width_ok(c) and (not joint or width_ok(h2 * hd + c)))
            if n2 is None:
                raise WidthBudgetError(f"{name}: no {key} width gives layer widths the later passes accept")
            if key in k.ffn or n2 != n_full:
                new.ffn[key] = keep_lowest_removed(scores[name][key], n_full - n2)
        out[name] = new
    return out


def plan_threshold(shapes: dict[str, BlockShape], gates: dict[str, dict[str, torch.Tensor]],
                   threshold: float) -> dict[str, BlockKeep]:
    """Keep the units whose gate is above `threshold` (kinds absent from `gates` stay whole); a kind with none
    above keeps its highest-gated unit (a block keeps one head and one neuron per FFN)."""
    keep = {}
    for name in shapes:
        k = BlockKeep()
        for kind, g in gates.get(name, {}).items():
            kept = [i for i in range(g.numel()) if float(g[i]) > threshold]
            k.set(kind, kept or [int(torch.argmax(g))])
        keep[name] = k
    return keep


def removed_params(shapes: dict[str, BlockShape], keep: dict[str, BlockKeep]) -> int:
    """Parameters `keep` removes from the blocks `shapes`, from the units' costs."""
    out = 0
    for name, s in shapes.items():
        k = keep[name]
        if k.heads is not None:
            out += (s.heads - len(k.heads)) * s.head_params
        out += sum((s.ffn[key] - len(v)) * s.neuron_params[key] for key, v in k.ffn.items())
    return out
