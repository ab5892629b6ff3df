"""The training loop every distillation shares: seeded global batches, sharding across processes,
gradient all-reduce, schedule, clipping, atomic checkpoints and resume.

The update is the same whether one process or N run it: each step draws the same global batch everywhere
(a generator seeded from `cfg.seed` and the step), each rank takes a contiguous shard, backpropagates its
shard's loss weighted by shard size / batch, and the gradients are summed across ranks. The summed gradient
is then the gradient of the global batch mean, so every rank applies the identical update.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import DistillError
from .config import DistillConfig

CHECKPOINT_FORMAT = 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def draw_batch(n_samples: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of step `step`: distinct row indices, a function of (seed, step) only."""
    g = torch.Generator().manual_seed(((seed & 0xFFFFFFFF) << 32) | (step & 0xFFFFFFFF))
    return torch.randperm(n_samples, generator=g)[:min(batch_size, n_samples)]


def lr_factor(cfg: DistillConfig, step: int) -> float:
    """Multiplier of cfg.lr at 0-based `step`: linear warm-up, then constant or cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def make_optimizer(params: list[nn.Parameter], cfg: DistillConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def checkpoint_path(checkpoint_dir: Path, key: str) -> Path:
    """A key reads `owner:slot` (e.g. `<recipe hash>:<pass index>:<what>`): the file is named by the slot, so a
    rerun of a changed recipe finds the old file and is told whose it is, instead of silently ignoring it."""
    slot = key.split(":", 1)[1] if ":" in key else key
    return Path(checkpoint_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "_", slot) + ".pt")


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients across ranks, one flat buffer per dtype (one collective instead of one per tensor)."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:   # a parameter this rank's shard did not reach still joins the sum
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


def _broadcast(params: list[nn.Parameter]) -> None:
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def _save_checkpoint(path: Path, key: str, step: int, losses: list[float], named: list, opt, sched) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CHECKPOINT_FORMAT, "key": key, "step": step, "losses": list(losses),
            "params": {n: p.detach().cpu().clone() for n, p in named},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)   # atomic: a reader sees the old checkpoint or the new one, never half of one


def _load_checkpoint(path: Path, key: str, named: list, opt, sched) -> tuple[int, list[float]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001  (any unreadable file: say which and what to do)
        raise DistillError(f"cannot read distillation checkpoint {path}: {e}",
                           hint=f"delete {path} to restart this distillation from step 0") from None
    if blob.get("key") != key:
        raise DistillError(f"checkpoint {path} belongs to another recipe or pass (its key is {blob.get('key')!r}, "
                           f"this run's is {key!r})",
                           hint=f"delete {path.parent} (the run's work directory) to start over with this recipe, "
                                "or run the recipe that wrote it to resume")
    params = blob["params"]
    missing = [n for n, _ in named if n not in params]
    if missing or len(params) != len(named):
        raise DistillError(f"checkpoint {path} holds other trainable parameters than this run "
                           f"(e.g. missing {missing[:3]})", hint=f"delete {path} to restart this distillation")
    with torch.no_grad():
        for n, p in named:
            p.copy_(params[n].to(p.device, p.dtype))
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return int(blob["step"]), [float(x) for x in blob["losses"]]


def _step_loss(loss_fn, shard: torch.Tensor, batch: int, micro: int | None) -> float:
    """Backpropagate this rank's shard (in micro-batches) weighted by its share of the global batch;
    returns that weighted loss (the ranks' values sum to the global mean)."""
    total = 0.0
    for part in shard.split(micro or max(1, len(shard))) if len(shard) else ():
        loss = loss_fn(part) * (len(part) / batch)
        loss.backward()
        total += float(loss.detach())
    return total


def _update(loss_fn, idx: torch.Tensor, params: list[nn.Parameter], opt, sched, cfg: DistillConfig, rank: int,
            world: int, desc: str, step: int) -> float:
    """Step `step` on the global batch `idx`: this rank's shard backpropagated, gradients and loss summed across
    ranks, the loss checked, gradients clipped, the update applied. Returns the global mean loss."""
    shard = idx.tensor_split(world)[rank]
    opt.zero_grad(set_to_none=True)
    local = _step_loss(loss_fn, shard, len(idx), cfg.micro_batch_size)
    if world > 1:
        _all_reduce_grads(params)
        t = torch.tensor([local], dtype=torch.float64, device=params[0].device)
        dist.all_reduce(t)
        local = float(t.item())
    if not math.isfinite(local):
        raise DistillError(f"{desc}: the loss became {local} at step {step}",
                           hint="lower `lr`, raise `warmup_steps`, or set `grad_clip`")
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    return local


def train(module: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n_samples: int | Callable[[int], int],
          cfg: DistillConfig, *, key: str, checkpoint_dir: Path | None = None, progress: bool = True,
          desc: str = "distill") -> list[float]:
    """Optimise `module`'s parameters that require grad; `loss_fn(indices)` returns the mean loss of those
    rows (0 <= index < n_samples). Returns the global mean loss of every step (resumed steps included).
    `n_samples` may be a function of the step (a data set that grows while training): called with 0, with
    the step the run starts at (after a resume), then before each step.

    Under an initialised torch.distributed every rank calls this with the same arguments; each computes its
    shard of every global batch and the update equals the single-process one. `cfg.micro_batch_size` bounds
    the rows per forward (gradient accumulation) without changing the update. With `checkpoint_dir`, rank 0
    writes `<dir>/<slot>.pt` every `cfg.checkpoint_every` steps and at the end; a run finding a checkpoint
    of the same `key` continues from it, one of another key raises DistillError.
    """
    named = trainable_parameters(module)
    if not named:
        raise DistillError(f"{desc}: nothing to train (no parameter requires grad)",
                           hint="select floating-point parameters with the pass's `trainable` patterns")
    rows_at = n_samples if callable(n_samples) else (lambda step: n_samples)
    if rows_at(0) < 1:
        raise DistillError(f"{desc}: no calibration rows to train on",
                           hint="capture calibration with block inputs (a pass needing them in the recipe)")
    params = [p for _, p in named]
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    rank, world = rank_world()
    path = checkpoint_path(checkpoint_dir, key) if checkpoint_dir is not None else None
    start, losses = 0, []
    if path is not None and path.exists():
        start, losses = _load_checkpoint(path, key, named, opt, sched)
    if world > 1:   # every rank starts from rank 0's parameters, whatever happened before
        _broadcast(params)
    start = min(start, cfg.steps)
    losses = losses[:start]
    rows_at(start)            # a growing data set catches up with a resumed run (even one already finished)
    writes = path is not None and rank == 0 and cfg.checkpoint_every > 0
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not progress or rank != 0)
    with torch.enable_grad():
        for step in range(start, cfg.steps):
            idx = draw_batch(rows_at(step), cfg.batch_size, cfg.seed, step)
            local = _update(loss_fn, idx, params, opt, sched, cfg, rank, world, desc, step)
            losses.append(local)
            bar.update(1)
            bar.set_postfix(loss=f"{local:.4g}")
            done = step + 1
            if writes and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                _save_checkpoint(path, key, done, losses, named, opt, sched)
    bar.close()
    opt.zero_grad(set_to_none=True)   # free the gradients: the module goes on to inference or other passes
    return losses
