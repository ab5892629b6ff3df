"""Student trajectories for end-to-end distillation (DAgger, Ross et al. 2011, applied to sampling).

Trained only on the teacher's own sampling trajectories, a pruned student is never shown the latents its
own small errors lead to, and those errors compound over the sampling steps (exposure bias). So, at evenly
spaced steps of training, the student's own trajectories (the calibration's sampling loop run on the
student as it is then) are captured and added to the training rows; the target at every row stays the
teacher's prediction there. Captures are kept in the run's work directory, so a resumed run trains on the
same rows.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..calib.sources import capture_trajectories
from ..calib.store import CalibrationStore, ModelInputs
from .engine import rank_world


def refresh_steps(steps: int, rounds: int) -> list[int]:
    """The steps before which round r = 1..rounds is captured: `steps` split into rounds + 1 equal parts."""
    return [steps * r // (rounds + 1) for r in range(1, rounds + 1)]


def concat_model_inputs(a: ModelInputs, b: ModelInputs) -> ModelInputs:
    """`a`'s rows followed by `b`'s; shared entries (e.g. FLUX's img_ids) must agree."""
    if a.per_sample != b.per_sample:
        raise ValueError(f"the captures' per-sample inputs differ: {sorted(a.per_sample)} vs {sorted(b.per_sample)}")
    out = {}
    for k, v in a.items():
        w = b[k]
        if k in a.per_sample:
            out[k] = torch.cat([v, w]) if torch.is_tensor(v) else list(v) + list(w)
        elif torch.is_tensor(v) and (v.shape != w.shape or not torch.equal(v, w)) or not torch.is_tensor(v) and v != w:
            raise ValueError(f"shared input {k!r} differs between the captures")
        else:
            out[k] = v
    return ModelInputs(out, a.per_sample)


class GrowingRows:
    """The training rows of an end-to-end distillation: the teacher's trajectories, then every capture of the
    student's own. `rows_at(step)` (the engine's `n_samples`) captures each round when its step comes."""

    def __init__(self, teacher_rows: ModelInputs, student: nn.Module, adapter, meta: dict, steps: int, rounds: int,
                 out_dir: Path, progress: bool = True):
        self.inputs, self.student, self.adapter, self.meta = teacher_rows, student, adapter, meta
        self.at = refresh_steps(steps, rounds) if rounds else []
        self.out_dir, self.progress = Path(out_dir), progress
        self.rounds_done = 0
        self.rows_per_round: list[int] = [teacher_rows.rows]

    def rows_at(self, step: int) -> int:
        while self.rounds_done < len(self.at) and self.at[self.rounds_done] <= step:
            self._capture(self.rounds_done + 1)
        return self.inputs.rows

    def _capture(self, r: int) -> None:
        rank, world = rank_world()
        d = self.out_dir / f"round_{r}"
        was_training = self.student.training
        self.student.eval()
        # one capture (or, resumed, the one on disk); the other ranks (same student weights) read it
        store = capture_trajectories(self.student, self.adapter, self.meta, d, progress=self.progress) \
            if rank == 0 else None
        if world > 1:
            dist.barrier()
        self.student.train(was_training)
        new = (store or CalibrationStore(d)).model_inputs()
        self.inputs = concat_model_inputs(self.inputs, new)
        self.rows_per_round.append(new.rows)
        self.rounds_done = r
