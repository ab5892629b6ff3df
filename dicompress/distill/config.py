"""DistillConfig: the optimisation settings every distillation (layer-wise or end-to-end) shares."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..config import PassConfig


class DistillConfig(PassConfig):
    """Usable on its own or as a nested key of a structural pass's config (e.g. `distill: {steps: 500}`)."""

    steps: int = Field(200, ge=0, description="optimiser steps (0 = no training)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(8, ge=1, description="global batch: calibration rows per step, summed over all "
                                                 "processes (capped at the number of rows)")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per forward/backward on one process "
                                         "(gradient accumulation; bounds memory, same update); null = whole shard")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="optimiser")
    weight_decay: float = Field(0.0, ge=0, description="decoupled for adamw, L2 for adam and sgd")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning-rate decay after warm-up: "
                                                                          "cosine decays to 0 at the last step")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; null = no clip")
    seed: int = Field(0, description="seeds the batch drawn at each step (same on every process and on resume)")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints in the run's work directory "
                                                        "(0 = never); an interrupted run resumes from the last one")

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.steps and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        return self


class EndToEndConfig(DistillConfig):
    """End-to-end distillation: DistillConfig plus where the training rows come from."""

    student_trajectories: int = Field(0, ge=0, description="rounds of the student's own sampling trajectories "
                                      "(the calibration's sampling loop run on the student as it is then) added to "
                                      "the rows at evenly spaced steps, targets still the teacher's predictions "
                                      "(DAgger against exposure bias); 0 = the teacher's trajectories only")
