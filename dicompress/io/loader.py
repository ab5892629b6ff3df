"""Loading an artifact: verified first, then read through diffusers' own `from_pretrained` (the registered
quantizer replays the manifest on the meta model before weights are read)."""
from __future__ import annotations

import os

import diffusers
import torch
from torch import nn

from .diffusers_plugin import register_with_diffusers
from .pluggable import plug_ffns as plug_ffns_, plug_intervals
from .verify import artifact_root, read_config, verify_artifact


def load(artifact_dir: str | os.PathLike, device: str | torch.device = "cpu",
         torch_dtype: torch.dtype | None = None, plug=None, verify: bool = False,
         plug_ffns=None) -> nn.Module:
    """Verify, then load through diffusers' own `from_pretrained`; returns the model in eval mode.

    Every load checks config, manifest and every weight file's header (no tensor data is read for that);
    `verify=True` also re-hashes every file against the SHA-256 recorded at write time (about 0.8 s per GiB) and
    refuses a file that differs. An artifact written before checksums were recorded loads either way.

    `torch_dtype` applies to the uncompressed parameters only; codec tensors keep their stored dtypes.
    With the default (None) those parameters are fp32, whatever dtype stores them: what CPU inference wants.
    `plug`: for `ppcl_depth` artifacts, the interval numbers to keep plugged in (None = all); the others get
    their teacher blocks back. `plug_ffns`: for `ppcl_width` artifacts, the FFN paths whose projectors stay plugged
    in (e.g. ["transformer_blocks.0.ff"]; None = all); the others get their teacher FFNs back.
    `artifact_dir` may be a pipeline directory of the pipeline layout: its transformer/ is loaded (the whole
    pipeline loads with diffusers' `DiffusionPipeline.from_pretrained`).
    """
    root = artifact_root(artifact_dir)
    summary = verify_artifact(root, checksums=verify)
    register_with_diffusers()
    cls = getattr(diffusers, summary["class_name"])
    model = cls.from_pretrained(root, torch_dtype=torch_dtype or torch.float32)
    if plug is not None:
        plug_intervals(model, root, read_config(root), plug)
    if plug_ffns is not None:
        plug_ffns_(model, root, read_config(root), plug_ffns)
    return model.to(device).eval()
