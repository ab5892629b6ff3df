"""The embedded model's per-class text conditioning (light: torch only, no diffusers pipelines)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Per-class text conditioning: prompt_embeds [C, T, D] and pooled_prompt_embeds [C, P]."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    def for_classes(self, classes: torch.Tensor):
        return self.prompt_embeds[classes], self.pooled_prompt_embeds[classes]
