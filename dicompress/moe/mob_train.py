"""Mixture of Blocks training on the shared distillation engine.

1. Routers (`train_routers`): the whole chain of blocks runs from the teacher's captured inputs of the first block
   with relaxed straight-through gates (blocks.py); the loss is the group feature loss, the mean over groups of
   consecutive blocks of the loss between the student's and the teacher's hidden states at each group's end (both
   streams), plus `budget_weight` x (mean skip probability over the skippable blocks - their target rate)^2. Only
   the routers train: one chain, so the budget is shared and the skips go where the group features suffer least.
2. Binarise (`binarize`): one threshold over every skippable block's logits on the calibration rows, chosen so that
   at least the target share of block executions is skipped there (more only where rows with the same temb, e.g.
   the same class and timestep, decide together), folded into each router's bias (run iff > 0).
3. Recovery (`recover_groups`, optional): with the hard gates, each group's blocks learn (block weights, not the
   routers) to map the teacher's inputs at the group's start to its outputs at the group's end.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..calib.encoding import to_module
from ..distill import DistillConfig, get_loss, train
from ..distill.layerwise import distill_block, per_sample_keys
from ..distill.params import module_device_dtype, trainable_only
from ..prune import teacher_io
from .blocks import skip_threshold

STREAMS = ("hidden_states", "encoder_hidden_states")


def groups_of(n_blocks: int, size: int) -> list[tuple[int, int]]:
    """[(first, last)] block indices of consecutive groups of `size` blocks."""
    if size < 1 or n_blocks % size:
        raise ValueError(f"a group size of {size} does not divide the {n_blocks} blocks")
    return [(s, s + size - 1) for s in range(0, n_blocks, size)]


def group_end_features(store, names: list[str], end: int) -> dict[str, torch.Tensor]:
    """The teacher's hidden states after block `end` (the next block's captured inputs, or the final outputs)."""
    out = store.block_inputs(names[end + 1], keys=list(STREAMS)) if end + 1 < len(names) else store.final_outputs()
    return {k: out[k] for k in STREAMS if k in out}


def budget_loss(p_run: list[torch.Tensor], rate: float) -> torch.Tensor:
    """(mean skip probability over the skippable blocks' samples - rate)^2."""
    skip = 1 - torch.stack([p.mean() for p in p_run]).mean()
    return (skip - rate) ** 2


def train_routers(model: nn.Module, adapter, store, names: list[str], skippable: list[int], groups, cfg: DistillConfig,
                  *, rate: float, budget_weight: float, tau: float, loss: str = "normalized_l2", key: str,
                  checkpoint_dir: Path | None = None, progress: bool = True) -> dict:
    """Train the skippable blocks' routers (see the module docstring); returns the loss curves."""
    loss_t = get_loss(loss)
    blocks = [model.get_submodule(n) for n in names]
    inputs = store.block_inputs(names[0])
    targets = [group_end_features(store, names, e) for _, e in groups]
    keys = per_sample_keys(adapter, inputs)
    n = inputs["hidden_states"].shape[0]
    device, dtype = module_device_dtype(model)
    shared = {k: to_module(v, device, dtype, cast=False) for k, v in inputs.items() if k not in keys}
    gen = torch.Generator().manual_seed(cfg.seed)
    ends = {e: g for g, (_, e) in enumerate(groups)}
    curves: dict[str, list[float]] = {"feature": [], "budget": [], "skip": []}

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        x = {**shared, **{k: to_module(inputs[k][idx], device, dtype) for k in keys}}
        feats = []
        for i, block in enumerate(blocks):
            x.update(adapter.run_block(block, x))
            if i in ends:
                t = targets[ends[i]]
                feats.append(sum(loss_t(x[s], t[s][idx].to(device)) for s in STREAMS if s in t))
        feature = sum(feats) / len(feats)
        p_run = [blocks[i].p_run for i in skippable]
        budget = budget_loss(p_run, rate)
        curves["feature"].append(float(feature.detach()))
        curves["budget"].append(float(budget.detach()))
        curves["skip"].append(float(1 - torch.stack([p.mean() for p in p_run]).mean().detach()))
        return feature + budget_weight * budget

    params = [f"{names[i]}.mob_router.{p}" for i in skippable for p in ("weight", "bias")]
    for i in skippable:
        blocks[i].relax(tau, gen)
    try:
        with trainable_only(model, params):
            losses = train(model, loss_fn, n, cfg, key=key, checkpoint_dir=checkpoint_dir, progress=progress,
                           desc="mob routers")
    finally:
        for i in skippable:
            blocks[i].relax(None)
    return {"loss": losses, **curves}


@torch.no_grad()
def router_logits(model: nn.Module, store, names: list[str], skippable: list[int]) -> torch.Tensor:
    """[skippable blocks, calibration rows] router logits on each block's captured temb."""
    out = []
    for i in skippable:
        block = model.get_submodule(names[i])
        temb = store.block_inputs(names[i], keys=["temb"])["temb"]
        p = block.mob_router.weight
        out.append(block.mob_router(temb.to(p.device, p.dtype)).float().cpu())
    return torch.stack(out)


@torch.no_grad()
def binarize(model: nn.Module, store, names: list[str], skippable: list[int], skip: float) -> dict:
    """Fold the threshold that skips `skip` of all block executions on the calibration rows into the routers'
    biases; returns the threshold and the skip rate per skippable block there."""
    logits = router_logits(model, store, names, skippable)
    rows = logits.shape[1]
    skips = math.ceil(skip * len(names) * rows - 1e-9)
    t = skip_threshold(logits, skips)
    for i in skippable:
        model.get_submodule(names[i]).mob_router.bias.sub_(t)
    after = router_logits(model, store, names, skippable)
    rates = (after <= 0).float().mean(1)
    return {"threshold": t, "rows": rows, "skipped": int((after <= 0).sum()),
            "skip_rate": {names[i]: round(float(r), 4) for i, r in zip(skippable, rates)}}


def recover_groups(model: nn.Module, adapter, store, names: list[str], groups, cfg: DistillConfig, *,
                   skip_rate: dict[str, float], loss: str = "normalized_l2", key: str,
                   checkpoint_dir: Path | None = None, progress: bool = True) -> list[dict]:
    """Per group, with the hard gates: its blocks' weights (not the routers) learn the teacher's group
    input -> output map. A group none of whose blocks skips on the calibration rows is left alone: on the teacher's
    inputs it computes the teacher's outputs exactly (loss 0, nothing to learn)."""
    rows = []
    for s, e in groups:
        if not any(skip_rate.get(names[i], 0.0) > 0 for i in range(s, e + 1)):
            rows.append({"group": f"{names[s]}..{names[e]}", "steps": 0, "reason": "no block of the group skips"})
            continue
        chain = nn.ModuleList(model.get_submodule(names[i]) for i in range(s, e + 1))
        inputs, targets = teacher_io(store, names, s, e)
        trainable = [n for n, p in chain.named_parameters() if p.is_floating_point() and "mob_router" not in n]
        losses = distill_block(chain, adapter, inputs, targets, cfg, loss=loss, key=f"{key}:{names[s]}",
                               checkpoint_dir=checkpoint_dir, progress=progress, desc=f"mob recovery {names[s]}",
                               trainable=trainable)
        rows.append({"group": f"{names[s]}..{names[e]}", "steps": len(losses),
                     "loss_first": round(losses[0], 6), "loss_last": round(losses[-1], 6)})
    return rows


@torch.no_grad()
def tracked_skips(model: nn.Module) -> tuple[int, int]:
    """(skipped, routed) samples counted by the gated blocks since tracking began."""
    from .blocks import is_gated
    gated = [m for m in model.modules() if is_gated(m)]
    return sum(m.mob_skipped for m in gated), sum(m.mob_seen for m in gated)
