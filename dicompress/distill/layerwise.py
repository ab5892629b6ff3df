"""Layer-wise distillation: a student block (or a chain of blocks) learns to map captured block inputs to
target outputs, e.g. PPCL's one block replacing the interval [s, e] (inputs of s, outputs of e)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .config import DistillConfig
from .engine import train
from .losses import get_loss
from ..calib.encoding import to_module
from .params import module_device_dtype, select_trainable, trainable_only


def block_chain(student: nn.Module) -> list[nn.Module]:
    """A ModuleList / Sequential is a chain of blocks run in order; anything else is one block."""
    return list(student) if isinstance(student, (nn.ModuleList, nn.Sequential)) else [student]


def run_chain(blocks: list[nn.Module], adapter, inputs: dict) -> dict:
    """Run blocks in order, each one's outputs replacing the inputs of the same name."""
    x = dict(inputs)
    for block in blocks:
        x.update(adapter.run_block(block, x))
    return x


def per_sample_keys(adapter, inputs: dict) -> list[str]:
    keys = [k for k in (*adapter.per_sample_inputs, "timestep") if k in inputs and torch.is_tensor(inputs[k])]
    if "hidden_states" not in keys:
        raise ValueError("block inputs need a per-sample 'hidden_states' (a calibration-store dict)")
    return keys


def distill_block(student: nn.Module, adapter, inputs: dict, targets: dict[str, torch.Tensor], cfg: DistillConfig, *,
                  loss: str = "normalized_l2", streams: tuple[str, ...] | None = None, key: str,
                  checkpoint_dir: Path | None = None, progress: bool = True, desc: str = "",
                  trainable: Sequence[str] | None = None) -> list[float]:
    """Train `student` so that running it (with `adapter.run_block`, block after block for a chain) on the
    captured `inputs` reproduces `targets` ({stream: [N, ...]}); the loss is summed over `streams` (default:
    every target). `trainable`: fnmatch patterns of the student's parameter names (default: every float
    parameter). Rows stay on the CPU and only each batch moves to the student's device."""
    loss_fn_t = get_loss(loss)
    streams = tuple(streams or targets)
    missing = [s for s in streams if s not in targets]
    if missing:
        raise ValueError(f"no targets for streams {missing}; targets hold {sorted(targets)}")
    keys = per_sample_keys(adapter, inputs)
    n = inputs["hidden_states"].shape[0]
    for s in streams:
        if targets[s].shape[0] != n:
            raise ValueError(f"targets[{s!r}] has {targets[s].shape[0]} rows, the inputs {n}")
    device, dtype = module_device_dtype(student)
    shared = {k: to_module(v, device, dtype, cast=False) for k, v in inputs.items() if k not in keys}
    blocks = block_chain(student)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        batch = {**shared, **{k: to_module(inputs[k][idx], device, dtype) for k in keys}}
        out = run_chain(blocks, adapter, batch)
        return sum(loss_fn_t(out[s], targets[s][idx].to(device)) for s in streams)

    with trainable_only(student, select_trainable(student, trainable)):
        return train(student, loss_fn, n, cfg, key=key, checkpoint_dir=checkpoint_dir, progress=progress,
                     desc=desc or "distill block")
