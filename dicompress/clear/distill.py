"""CLEAR's distillation loss on the teacher's own sampling trajectories (the calibration's model inputs), trained on
the shared engine (distill/engine.py: seeded batches, sharding across processes, checkpoints and resume):

    loss = flow_weight * MSE(v_student, (z - x0) / sigma)          flow matching towards the teacher's sample
         + teacher_weight * MSE(v_student, v_teacher)              the teacher's prediction
         + attention_weight * mean over CLEAR modules of MSE(attention output, teacher's)

at each captured row (latent z at sigma along a teacher trajectory). x0 is the teacher's final latent of that
trajectory (the last captured latent plus one Euler step of the teacher); (z - x0) / sigma is the flow-matching
velocity of the straight path through z that ends at x0, the target CLEAR's paper trains on its teacher-generated
images with.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..distill.config import DistillConfig
from ..distill.end_to_end import per_sample_names, prediction, recording, rows
from ..distill.engine import train
from ..distill.losses import mse
from ..distill.params import module_device_dtype, select_trainable, trainable_only
from ..prune.trajectory import trajectories_from_rows


@torch.no_grad()
def teacher_endpoints(teacher: nn.Module, model_inputs, meta: dict | None, batch: int = 8) -> torch.Tensor:
    """x0 of every captured row: the teacher's final latent of the trajectory the row belongs to, [rows, ...]."""
    traj = trajectories_from_rows(model_inputs, meta)
    per = per_sample_names(model_inputs, teacher)
    device, dtype = module_device_dtype(teacher)
    last = traj.rows[:, -1]
    ends = []
    for part in last.split(batch):
        kw = rows(model_inputs, per, part, device, dtype)
        v = prediction(teacher, kw).float()
        sigma = model_inputs["timestep"][part].to(device).float().view(-1, *([1] * (v.ndim - 1)))
        ends.append((kw["hidden_states"].float() - sigma * v).cpu())
    x0_traj = torch.cat(ends)
    out = torch.empty((model_inputs["hidden_states"].shape[0], *x0_traj.shape[1:]), dtype=torch.float32)
    for s in range(traj.samples):
        out[traj.rows[s]] = x0_traj[s]
    return out


def distill_clear(student: nn.Module, teacher: nn.Module, model_inputs, cfg: DistillConfig, *,
                  attention: Sequence[str], trainable: Sequence[str], meta: dict | None, key: str,
                  checkpoint_dir: Path | None = None, progress: bool = True, flow_weight: float = 1.0,
                  teacher_weight: float = 0.5, attention_weight: float = 0.5, desc: str = "clear") -> list[float]:
    """Train the `trainable` parameters (fnmatch patterns) of `student` with the loss above; `attention`: the
    CLEAR attention modules whose outputs are matched to the teacher's modules of the same names."""
    per = per_sample_names(model_inputs, student)
    device, dtype = module_device_dtype(student)
    teacher.requires_grad_(False)
    x0 = teacher_endpoints(teacher, model_inputs, meta) if flow_weight else None
    sigma = model_inputs["timestep"].float()
    names = list(attention) if attention_weight else []

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        kw = rows(model_inputs, per, idx, device, dtype)
        with torch.no_grad(), recording(teacher, names) as t_feats:
            v_teacher = prediction(teacher, kw)
        with recording(student, names) as s_feats:
            v = prediction(student, kw)
        total = teacher_weight * mse(v, v_teacher)
        if x0 is not None:
            s = sigma[idx].to(device).view(-1, *([1] * (v.ndim - 1)))
            target = (kw["hidden_states"].float() - x0[idx].to(device)) / s
            total = total + flow_weight * mse(v, target)
        if names:
            attn = sum(sum(mse(a, b) for a, b in zip(s_feats[n], t_feats[n])) for n in names)
            total = total + attention_weight * attn / len(names)
        return total

    with trainable_only(student, select_trainable(student, trainable)):
        return train(student, loss_fn, model_inputs["hidden_states"].shape[0], cfg, key=key,
                     checkpoint_dir=checkpoint_dir, progress=progress, desc=desc)
