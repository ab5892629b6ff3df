"""PPCL's pluggable parts at load time: keep any subset of the trained interval blocks, give the others
their teacher blocks back (stored by `ppcl_depth` in ppcl_intervals.safetensors); likewise any subset of the
FFN projectors (`ppcl_width`, teacher FFNs in ppcl_width_ffns.safetensors)."""
from __future__ import annotations

import copy
import os
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ..arch import adapter_for
from ..errors import ArtifactError
from ..nn.surgery import set_block_list, set_module
from .names import FFNS_NAME, INTERVALS_NAME


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


def ffn_entries(config: dict) -> list[dict]:
    return [e for e in config.get("quantization_config", {}).get("manifest", []) if e.get("op") == "ppcl_width"]


def ffn_name(entry: dict) -> str:
    """How `plug_ffns` names a projector: its FFN's path (a FLUX single block's MLP: "<block>.mlp")."""
    return f"{entry['module']}.{entry['ffn']}" if entry.get("ffn") else entry["module"]


def plug_ffns(model: nn.Module, artifact_dir: str | os.PathLike, config: dict, plug) -> nn.Module:
    """Unplug every `ppcl_width` projector whose FFN name (e.g. "transformer_blocks.0.ff",
    "single_transformer_blocks.0.mlp") is not in `plug`: the teacher FFN it replaced comes back (stored by
    `ppcl_width` in ppcl_width_ffns.safetensors). In place; returns `model`."""
    from ..prune.projector import ResidualProjector, restore_single_mlp, teacher_ffn
    entries = ffn_entries(config)
    known = [ffn_name(e) for e in entries]
    plug = set(plug)
    if plug - set(known):
        raise ArtifactError(f"plug_ffns names {sorted(plug - set(known))}, which are not projectors of this artifact",
                            hint=f"its projectors: {known}")
    unplug = [e for e in entries if ffn_name(e) not in plug]
    if not unplug:
        return model
    path = Path(artifact_dir) / FFNS_NAME
    if not path.is_file():
        raise ArtifactError(f"{path.name} is missing: this artifact cannot unplug projectors",
                            hint="it was written with keep_teacher_ffns: false; load it with every projector plugged")
    weights = load_file(str(path))
    for e in unplug:
        name, prefix = ffn_name(e), e["module"] + "."
        stored = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        module = model.get_submodule(e["module"])
        try:
            if e.get("ffn"):
                restore_single_mlp(module, e, stored)
                continue
            if not isinstance(module, ResidualProjector) or type(module.proj) is not nn.Linear:
                raise ValueError(f"the projector is a {type(module).__name__} over a "
                                 f"{type(getattr(module, 'proj', module)).__name__}, no longer the plain projector "
                                 "ppcl_width wrote (a later pass quantized or rewrote it)")
            ffn = teacher_ffn(e, dtype=module.proj.weight.dtype)
            ffn.load_state_dict(stored, strict=True)
            set_module(model, e["module"], ffn.to(module.proj.weight.device))
        except ValueError as err:
            raise ArtifactError(f"{name}: {err}; the teacher FFN would not match the rest of the model",
                                hint="load this artifact with every projector plugged") from None
        except RuntimeError as err:
            raise ArtifactError(f"{name}: the stored teacher FFN does not fit the manifest's shape: {err}") from None
    return model
