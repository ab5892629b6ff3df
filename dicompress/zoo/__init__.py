"""Small models that ship with the package. `zoo:tiny-flux-digits` is the embedded default."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from ..errors import ModelError
from .classifier import DigitClassifier
from .conditioning import Conditioning

ZOO_DIR = Path(__file__).parent
ZOO = {"tiny-flux-digits": ZOO_DIR / "tiny_flux_digits"}
PREFIX = "zoo:"
CONDITIONING_NAME = "conditioning.safetensors"   # the class-conditioning table
CLASSIFIER_NAME = "classifier.safetensors"       # the digit classifier that scores samples
ZOO_FILES = (CONDITIONING_NAME, CLASSIFIER_NAME)  # what makes a directory a zoo model (artifacts copy them)


def zoo_path(name: str) -> Path:
    """Directory of a zoo model, given `zoo:NAME` or `NAME`."""
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}", hint=f"available: {', '.join(PREFIX + k for k in ZOO)}")
    path = ZOO[key]
    if not (path / "config.json").exists():
        raise ModelError(f"zoo model {name!r} is missing its files at {path}",
                         hint="reinstall dicompress, or rebuild it with tools/train_tiny_flux.py")
    return path


def is_zoo_dir(path: str | Path) -> bool:
    return all((Path(path) / name).exists() for name in ZOO_FILES)


def load_conditioning(path: str | Path):
    t = load_file(str(Path(path) / CONDITIONING_NAME))
    return Conditioning(t["prompt_embeds"], t["pooled_prompt_embeds"])


def load_classifier(path: str | Path):
    clf = DigitClassifier()
    clf.load_state_dict(load_file(str(Path(path) / CLASSIFIER_NAME)))
    return clf.eval().requires_grad_(False)

