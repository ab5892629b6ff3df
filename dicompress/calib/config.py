"""CalibrationConfig: what a calibration capture runs (a leaf: it imports only dicompress.config, so the
calibration code, recipes and passes can all read it without importing each other)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..config import StrictModel

MAX_SEED = 2**32 - 1                    # seeds are 32-bit (as numpy and most samplers take them)


class CalibrationConfig(StrictModel):
    """What the calibration capture runs: every sampling timestep of every (condition, seed) pair."""

    source: Literal["classes", "embeddings", "prompts", "synthetic"] = "classes"
    # classes: which class rows (default: all); each must be a row of the model's class table (checked by `run`)
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    prompts: str | None = None              # prompts: text file, one prompt per line
    embeddings: str | None = None           # embeddings: safetensors with prompt_embeds, pooled_prompt_embeds
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=lambda: [0], min_length=1)
    steps: int = Field(16, ge=1, le=1000)   # sampling steps (all captured)
    batch_size: int = Field(20, ge=1, le=4096)
    # samples each block runs at once during the capture, and rows per stored chunk (what block-by-block
    # work reads at once); null: the whole batch. A large batch_size with a small block_batch runs the
    # sampling loop's model calls on many samples while bounding activation memory: streaming reads every
    # block from the checkpoint once per model call, so this divides the reads by batch_size / block_batch.
    block_batch: int | None = Field(None, ge=1, le=4096)
    guidance_scale: float = Field(3.5, ge=0, le=100)           # prompts source
    height: int = Field(1024, ge=16, le=8192, multiple_of=16)   # prompts source, pixels (multiples of 16)
    width: int = Field(1024, ge=16, le=8192, multiple_of=16)
    # prompts source: text tokens per prompt (longer prompts are truncated, as diffusers does); null: the
    # pipeline's own default (512 for FLUX.1-dev and Qwen-Image; FLUX.1-schnell is run with 256)
    max_sequence_length: int | None = Field(None, ge=1, le=8192)
    # auto: every block's inputs when a pass reading this capture needs them, else the transformer's own inputs
    # alone when a pass reads only those (distill, mask_prune, Taylor width_prune), else statistics only
    block_inputs: Literal["auto"] | bool = "auto"
    # dtype of the stored block inputs (capture store, streaming's work directory): bfloat16 halves the disk of
    # the largest thing a run writes (FLUX.1-dev at 1024 px: 54 MiB per row per block boundary in float32);
    # passes read them back in the compute dtype. Model inputs, rotary tables and statistics stay float32.
    store_dtype: Literal["float32", "bfloat16"] = "float32"
    cache_dir: str | None = None            # default: $DICOMPRESS_CACHE or ~/.cache/dicompress

    @model_validator(mode="after")
    def _source_fields(self):
        need = {"prompts": "prompts", "embeddings": "embeddings"}.get(self.source)
        if need and not getattr(self, need):
            raise ValueError(f"source '{self.source}' needs the key '{need}'")
        return self
