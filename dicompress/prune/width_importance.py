"""Scores of every head and FFN neuron of the selected blocks, from torch-pruning's importance estimators.

Each block's unit groups (`width_groups.unit_groups`: torch-pruning `Group`s whose root index is the unit) go through
- `magnitude`: `tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)`: the
  squared L2 norm of everything the unit holds (a head's q/k/v rows and output columns, a neuron's up row and
  down column; biases left out, as torch-pruning's default);
- `taylor`: `tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)`: sum of |w * dL/dw| over
  the unit. The loss a pruned model should keep small is its output's distance to the unpruned model's, but at
  the unpruned weights that distance and its gradient are exactly zero, so its first-order Taylor term says
  nothing. We take instead L = <f(x), r>, r ~ N(0, I) per output element (a random direction in output space,
  Hutchinson-style): |w * dL/dw| is then the first-order change of the output along r when w is removed, and its
  sum over `probes` draws estimates how much of the output each unit carries. x: `batch` rows of the
  calibration's model inputs (the teacher's sampling trajectories), one batch per probe;
- `random`: `tp.importance.RandomImportance` (uniform scores), seeded.
Scores are raw (no normalisation); the planner normalises where units of different blocks compete.
"""
from __future__ import annotations

import torch
import torch_pruning as tp

from ..distill.end_to_end import per_sample_names, prediction, rows
from .width import layout_for
from .width_groups import unit_groups

METHODS = ("magnitude", "taylor", "random")


def _n_units(block, adapter, stream, kind) -> int:
    from .width import block_shape
    s = block_shape(block, layout_for(adapter, stream))
    return s.heads if kind == "heads" else s.ffn[kind]


def _estimator(method: str):
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)
    if method == "taylor":
        return tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    if method == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown importance {method!r}; choose one of {METHODS}")


def _groups(model, adapter, refs, use_dependency_graph: bool) -> tuple[dict, dict]:
    groups, traced = {}, {}
    for r in refs:
        block = model.get_submodule(r.name)
        g = unit_groups(block, adapter, r.stream, use_dependency_graph)
        groups[r.name] = g
        traced[r.name] = sorted(k for k, grp in g.items() if getattr(grp, "_DG", None) is not None)
    return groups, traced


def unit_scores(model, adapter, refs, method: str, *, seed: int = 0, model_inputs=None, batch: int = 16,
                probes: int = 4, use_dependency_graph: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{block name: {"heads": [H], ffn key: [N]}} scores (higher = more important) for the blocks `refs`, and
    what was done (`traced`: the FFN groups torch-pruning's DependencyGraph supplied, per block)."""
    groups, traced = _groups(model, adapter, refs, use_dependency_graph)
    est = _estimator(method)
    sizes = {r.name: {k: _n_units(model.get_submodule(r.name), adapter, r.stream, k) for k in groups[r.name]}
             for r in refs}
    info = {"traced": traced}
    if method == "taylor":
        if model_inputs is None:
            raise ValueError("taylor importance needs the calibration's model inputs")
        return _taylor(model, refs, groups, sizes, est, model_inputs, seed, batch, probes), \
            {**info, "batch": batch, "probes": probes}
    scores = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for r in refs:
            scores[r.name] = {k: est(g)[:sizes[r.name][k]].detach().float().cpu() for k, g in groups[r.name].items()}
    return scores, info


def _taylor(model, refs, groups, sizes, est, model_inputs, seed, batch, probes):
    params = [p for r in refs for p in model.get_submodule(r.name).parameters()]
    was = [p.requires_grad for p in params]
    others = [p for p in model.parameters() if all(p is not q for q in params)]
    was_other = [p.requires_grad for p in others]
    device, dtype = params[0].device, params[0].dtype
    per = per_sample_names(model_inputs, model)
    n = model_inputs["hidden_states"].shape[0]
    g = torch.Generator().manual_seed(seed)
    scores = {r.name: {k: torch.zeros(sizes[r.name][k]) for k in groups[r.name]} for r in refs}
    try:
        for p in others:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for _ in range(probes):
            model.zero_grad(set_to_none=True)
            idx = torch.randperm(n, generator=g)[:min(batch, n)]
            with torch.enable_grad():
                out = prediction(model, rows(model_inputs, per, idx, device, dtype))
                r = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
                (out * r).sum().backward()
            for ref in refs:
                for k, grp in groups[ref.name].items():
                    scores[ref.name][k] += est(grp)[:sizes[ref.name][k]].detach().float().cpu()
    finally:
        model.zero_grad(set_to_none=True)
        for p, w in zip(params, was):
            p.requires_grad_(w)
        for p, w in zip(others, was_other):
            p.requires_grad_(w)
    return scores
