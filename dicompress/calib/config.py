"""CalibrationConfig: what a calibration capture runs (a leaf: it imports only dicompress.config, so the
calibration code, recipes and passes can all read it without importing each other)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from ..config import StrictModel


class CalibrationConfig(StrictModel):
    """What the calibration capture runs: every sampling timestep of every (condition, seed) pair."""

    source: Literal["classes", "embeddings", "prompts", "synthetic"] = "classes"
    classes: list[int] | None = None        # classes: which class rows (default: all)
    prompts: str | None = None              # prompts: text file, one prompt per line
    embeddings: str | None = None           # embeddings: safetensors with prompt_embeds, pooled_prompt_embeds
    seeds: list[int] = Field(default_factory=lambda: [0])
    steps: PositiveInt = 16                 # sampling steps (all captured)
    batch_size: PositiveInt = 20
    # samples each block runs at once during the capture, and rows per stored chunk (what block-by-block
    # work reads at once); null: the whole batch. A large batch_size with a small block_batch runs the
    # sampling loop's model calls on many samples while bounding activation memory: streaming reads every
    # block from the checkpoint once per model call, so this divides the reads by batch_size / block_batch.
    block_batch: PositiveInt | None = None
    guidance_scale: float = 3.5             # prompts source
    height: PositiveInt = 1024              # prompts source, pixels
    width: PositiveInt = 1024
    block_inputs: Literal["auto"] | bool = "auto"   # auto: captured when a pass needs them
    cache_dir: str | None = None            # default: $DICOMPRESS_CACHE or ~/.cache/dicompress

    @model_validator(mode="after")
    def _source_fields(self):
        need = {"prompts": "prompts", "embeddings": "embeddings"}.get(self.source)
        if need and not getattr(self, need):
            raise ValueError(f"source '{self.source}' needs the key '{need}'")
        return self
