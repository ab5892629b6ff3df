"""Config base classes (a leaf: imports nothing of dicompress, so every layer can build configs on them)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A settings model whose unknown keys are errors (recipe sections: calibration, eval, streaming ...)."""

    model_config = ConfigDict(extra="forbid")


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
