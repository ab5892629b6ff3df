"""Resolve a recipe's `model` (zoo name, local directory, or an already-downloaded hub id) without
loading weights, so a wrong model fails within seconds."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import adapter_for_class, supported_classes
from .errors import ModelError
from .zoo import PREFIX, is_zoo_dir, zoo_path

HINT = "pass --model PATH (a local diffusers transformer or pipeline directory) or --model zoo:tiny-flux-digits"


@dataclass
class ModelInfo:
    name: str                   # what the user wrote
    path: Path                  # the transformer directory (config.json + safetensors)
    class_name: str             # diffusers class, e.g. FluxTransformer2DModel
    pipeline_root: Path | None  # the pipeline directory (model_index.json), when there is one
    is_zoo: bool                # ships conditioning + classifier (digits evaluation available)

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "class": self.class_name,
                "pipeline_root": str(self.pipeline_root) if self.pipeline_root else None}


def _class_of(transformer_dir: Path) -> str:
    try:
        cfg = json.loads((transformer_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:      # ValueError: malformed JSON or not UTF-8
        raise ModelError(f"{transformer_dir}/config.json is unreadable: {e}", hint=HINT) from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{transformer_dir}/config.json is not a diffusers config (a JSON {type(cfg).__name__}, "
                         "not a mapping)", hint=HINT)
    name = cfg.get("_class_name")
    if not name or not isinstance(name, str):
        raise ModelError(f"{transformer_dir} is not a diffusers model (config.json has no _class_name)", hint=HINT)
    return name


def _from_dir(name: str, d: Path) -> ModelInfo:
    if (d / "model_index.json").exists():
        if not (d / "transformer" / "config.json").exists():
            raise ModelError(f"{d} is a diffusers pipeline without a transformer/ folder", hint=HINT)
        root, tdir = d, d / "transformer"
    elif (d / "config.json").exists():
        tdir = d
        root = d.parent if (d.parent / "model_index.json").exists() else None
    else:
        raise ModelError(f"{d} is not a diffusers model: it has neither config.json nor model_index.json", hint=HINT)
    cls = _class_of(tdir)
    if adapter_for_class(cls) is None:
        raise ModelError(f"unsupported architecture {cls} (in {tdir})",
                         hint=f"supported model classes: {', '.join(supported_classes())}")
    return ModelInfo(name, tdir, cls, root, is_zoo_dir(tdir))


def resolve_model(spec: str) -> ModelInfo:
    if spec.startswith(PREFIX):
        return _from_dir(spec, zoo_path(spec))
    p = Path(os.path.expanduser(spec))
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path {spec} is a file; expected a diffusers model directory", hint=HINT)
        return _from_dir(spec, p)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_like_path:
        raise ModelError(f"model path {spec} does not exist", hint=HINT)
    from huggingface_hub import snapshot_download   # lazy: only hub ids need it
    try:  # a hub id: only what is already on this machine; dicompress never downloads weights
        local = Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise ModelError(f"model {spec!r} is not on this machine (dicompress never downloads weights at run time)",
                         hint=f"download it first (`huggingface-cli download {spec}`), or {HINT}") from None
    return _from_dir(spec, local)


def _diffusers_class(info: ModelInfo):
    import diffusers   # lazy: resolving a model (recipe checks, --dry-run) reads JSON alone; diffusers takes seconds
    return getattr(diffusers, info.class_name)


def load_transformer(info: ModelInfo, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    cls = _diffusers_class(info)
    model = cls.from_pretrained(str(info.path), torch_dtype=dtype).to(device)
    # from_pretrained leaves zero-copy views into the mmapped checkpoint at unaligned offsets, where CPU GEMMs
    # round differently (1 ulp) than on aligned memory; the artifact loader realigns, so the model in memory must
    # too, or what a run computes and what its artifact computes differ (the write-time load check sees it)
    from .io.diffusers_plugin import _realign_cpu_tensors   # lazy: the plug-in imports diffusers' quantizers
    _realign_cpu_tensors(model)
    return model.eval()


def meta_model(info: ModelInfo):
    """The model's module tree on the meta device (shapes only, no memory, no weights read)."""
    cls = _diffusers_class(info)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(info.path)))
