"""Errors a user can act on. The CLI prints them without a traceback and exits with `exit_code`:

    1  anything else (DicompressError itself, an OSError the CLI caught)
    2  the input is wrong: the recipe (RecipeError, also a work directory left by another recipe), the model
       (ModelError, also a damaged checkpoint), the calibration (CalibrationError, also an unwritable cache),
       distillation checkpoints (DistillError), an environment setting (SettingsError)
    3  the artifact: incomplete, corrupt, from a newer format, or its output cannot be written (an existing
       output, an unwritable directory, another run writing the same output)
"""
from __future__ import annotations


class DicompressError(Exception):
    """Base error: `str(e)` says what went wrong, `hint` says what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class RecipeError(DicompressError):
    """A recipe is malformed; names the file and the key path (e.g. `passes[1].tlq.bits`)."""

    exit_code = 2

    def __init__(self, message: str, file: str | None = None, key: str | None = None, hint: str | None = None):
        where = ":".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message, hint)
        self.file, self.key = file, key


class ModelError(DicompressError):
    """A model path is missing, not a diffusers model, or of an unsupported architecture."""

    exit_code = 2


class ArtifactError(DicompressError):
    """An artifact is incomplete, corrupt, inconsistent, or from a newer format."""

    exit_code = 3


class CalibrationError(DicompressError):
    """Calibration data is missing or does not match the model."""

    exit_code = 2


class DistillError(DicompressError):
    """Distillation cannot start or continue (e.g. a checkpoint left by another recipe or pass)."""

    exit_code = 2


class SettingsError(DicompressError):
    """An environment setting (DICOMPRESS_KERNELS, DICOMPRESS_GEMM_MODE) holds a value dicompress does not know."""

    exit_code = 2
