"""A diffusers checkpoint read block by block: the model's module tree on the meta device, and each block's
weights read from its safetensors (shard-aware, plain reads) only while that block is needed."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
from accelerate import init_empty_weights
from torch import nn

from ..errors import ModelError
from ..io.names import INDEX_NAME, WEIGHTS_NAME
from ..io.safetensors_file import CHECKPOINT_HINT, ST_DTYPE_BY_NAME, read_safetensors_header


class Checkpoint:
    """The safetensors weights of one diffusers transformer directory, tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelError(f"{index} is unreadable: {e}", hint="download or save the checkpoint again") from e
            self.files = {name: self.path / f for name, f in weight_map.items()}
        elif (self.path / WEIGHTS_NAME).is_file():
            header = read_safetensors_header(self.path / WEIGHTS_NAME, error=ModelError, hint=CHECKPOINT_HINT)
            self.files = dict.fromkeys(sorted(header), self.path / WEIGHTS_NAME)
        else:
            raise ModelError(f"{self.path} has no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}); streaming "
                             "reads safetensors only",
                             hint="save the model with `save_pretrained(dir, safe_serialization=True)`, or set "
                                  "`streaming: {enabled: false}` in the recipe")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise ModelError(f"checkpoint shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing[:3])}",
                             hint="the download is incomplete; download the model again")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.files if not prefix or n.startswith(prefix + ".")]

    def state_dict(self, names, strip: str = "", dtype: torch.dtype | None = None, device="cpu") -> dict:
        """Tensors `names` (floats cast to `dtype`), keys without the `strip` prefix."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            for n, t in read_tensors(file, keys).items():
                out[n[len(strip):]] = t.to(device=device, dtype=dtype) if dtype is not None and \
                    t.is_floating_point() else t.to(device)
        return out

    def load_module(self, model: nn.Module, name: str, dtype: torch.dtype, device) -> nn.Module:
        """Give submodule `name` (on the meta device) its weights from the checkpoint; returns it."""
        module = model.get_submodule(name)
        sd = self.state_dict(self.names(name), strip=name + ".", dtype=dtype, device=device)
        self._check(sd, module.state_dict(), f"{type(model).__name__}.{name}")
        module.load_state_dict(sd, assign=True)
        return module

    def _check(self, got: dict, want: dict, where: str) -> None:
        lost, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [f"{k} {tuple(got[k].shape)} != {tuple(want[k].shape)}" for k in sorted(set(got) & set(want))
                  if got[k].shape != want[k].shape]
        if lost or extra or shapes:
            raise ModelError(f"checkpoint {self.path} does not match {where}: "
                             + "; ".join(f"{what} {items[:3]}" for what, items in
                                         (("missing", lost), ("unexpected", extra), ("shapes", shapes)) if items),
                             hint="the checkpoint belongs to another architecture or configuration")

    def load_root(self, model: nn.Module, blocks: list[str], dtype: torch.dtype, device) -> None:
        """Load every weight outside `blocks` (embedders, output head): small, and needed throughout."""
        def in_block(n):
            return any(n.startswith(b + ".") for b in blocks)
        want = {n: t for n, t in model.state_dict().items() if not in_block(n)}
        sd = self.state_dict([n for n in self.files if not in_block(n)], dtype=dtype, device=device)
        self._check(sd, want, type(model).__name__)
        model.load_state_dict(sd, strict=False, assign=True)


def read_tensors(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors `names` of one safetensors file, read with plain reads of their byte ranges. Not through a
    memory map: mapped pages count as resident memory, and a shard read that way keeps a block's bf16 bytes
    resident beside its fp32 copy (0.7 GB at FLUX's width). The header is checked first (a truncated file or
    offsets outside it are refused before any read)."""
    header = read_safetensors_header(file, error=ModelError, hint=CHECKPOINT_HINT)
    out = {}
    with open(file, "rb") as f:
        for name in names:
            entry = header.get(name)
            if entry is None:
                raise ModelError(f"{file} has no tensor {name}, which {INDEX_NAME} places there",
                                 hint=CHECKPOINT_HINT)
            dtype = ST_DTYPE_BY_NAME.get(entry.dtype)
            if dtype is None:
                raise ModelError(f"{file}: tensor {name} has dtype {entry.dtype}, which dicompress cannot read",
                                 hint="convert the checkpoint to float or bfloat16 safetensors")
            buf = bytearray(entry.stop - entry.start)
            f.seek(entry.start)
            f.readinto(buf)
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(entry.shape)
    return out


def skeleton(class_name: str, path: Path) -> nn.Module:
    """The model's module tree from its config: parameters on the meta device, buffers real (as diffusers'
    from_pretrained builds it), so non-persistent buffers such as rotary tables are computed."""
    cls = getattr(diffusers, class_name)
    config = cls.load_config(str(path))
    with init_empty_weights():
        model = cls.from_config(config)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "dicompress":    # a restructured artifact: e.g. `width` ops narrow its blocks
        from ..io.manifest import replay
        replay(model, qc.get("manifest", []), device="meta", written_by=qc.get("dicompress_version"))
    model.register_to_config(_name_or_path=str(path))    # as from_pretrained records it (config.json)
    return model.eval().requires_grad_(False)


def release(module: nn.Module) -> None:
    """Drop a block's tensors (parameters and buffers go to the meta device; shapes and dtypes stay)."""
    module.to("meta")


@contextmanager
def offloaded(model: nn.Module, blocks: list[str], checkpoint: Checkpoint, dtype: torch.dtype, device):
    """While active, each block is read from the checkpoint when it is called and released when it returns:
    the whole model runs with one block's weights in memory (calibration's sampling loop)."""
    handles = []
    for name in blocks:
        block = model.get_submodule(name)
        handles.append(block.register_forward_pre_hook(
            lambda mod, args, name=name: checkpoint.load_module(model, name, dtype, device) and None))
        handles.append(block.register_forward_hook(lambda mod, args, out: release(mod)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for name in blocks:
            release(model.get_submodule(name))
