"""PPCL's pluggable intervals at load time: keep any subset of the trained interval blocks, give the others
their teacher blocks back (stored by `ppcl_depth` in ppcl_intervals.safetensors)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..arch import adapter_for
from ..errors import ArtifactError
from ..nn.surgery import set_block_list
from .names import INTERVALS_NAME


def interval_entries(config: dict) -> list[dict]:
    return [e for e in config.get("quantization_config", {}).get("manifest", []) if e.get("op") == "ppcl_interval"]


def plug_intervals(model: nn.Module, artifact_dir: str | os.PathLike, config: dict, plug) -> nn.Module:
    """Unplug every PPCL interval not in `plug` (interval numbers as in the manifest / report): its trained block
    is replaced by the teacher blocks it stood for. In place; returns `model`."""
    entries = interval_entries(config)
    known = {e["interval"] for e in entries}
    plug = set(plug)
    if plug - known:
        raise ArtifactError(f"plug names intervals {sorted(plug - known)}; this artifact has {sorted(known)}")
    unplug = [e for e in entries if e["interval"] not in plug]
    if not unplug:
        return model
    path = Path(artifact_dir) / INTERVALS_NAME
    if not path.is_file():
        raise ArtifactError(f"{path.name} is missing: this artifact cannot unplug intervals",
                            hint="it was written with keep_teacher_blocks: false; load it with every interval plugged")
    weights = load_file(str(path))
    adapter = adapter_for(model)
    # later positions first, so earlier indices stay valid while lists grow
    def where(e):
        attr, _, pos = e["module"].rpartition(".")
        return attr, int(pos)

    for e in sorted(unplug, key=where, reverse=True):
        attr, _, pos = e["module"].rpartition(".")
        blocks = list(getattr(model, attr))
        student = blocks[int(pos)]
        originals = []
        for j in range(e["end"] - e["start"] + 1):
            block = copy.deepcopy(student)
            prefix = f"{e['interval']}.{j}."
            sd = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            try:
                block.load_state_dict(sd, strict=True)
            except RuntimeError as err:
                raise ArtifactError(f"interval {e['interval']}: the teacher blocks do not fit the trained block's "
                                    f"structure (was it quantized after pruning?): {err}") from None
            originals.append(block.to(next(student.parameters()).device))
        blocks[int(pos):int(pos) + 1] = originals
        set_block_list(model, adapter, attr, blocks)
    return model
