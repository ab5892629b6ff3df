"""The calibration store: captured block inputs and per-linear input statistics, on disk.

Layout (one directory per capture):
    meta.json                              what was captured (source, classes/prompts, seeds, steps ...)
    blocks/<block>/chunk_00000.safetensors per-sample block inputs (+ "timestep"), one chunk per model call
    shared/<block>.safetensors             inputs shared by all samples (e.g. rotary embeddings)
    final/chunk_00000.safetensors          outputs of the last block (targets for distillation)
    model_inputs/chunk_00000.safetensors   the transformer's own forward kwargs, per sample (see below)
    model_inputs/shared.safetensors        ... its tensor kwargs without a batch dimension, stored once
    model_inputs/values.json               ... its non-tensor kwargs (e.g. Qwen-Image's img_shapes)
    linear_stats.safetensors               <linear>.absmax / .sumsq [in_features], <linear>.count [1]

Blocks are read one at a time, so memory does not grow with depth.

Model inputs (captured with the block inputs, for end-to-end distillation) are every forward kwarg of the
transformer at every call: one row per (sample, sampling step), in the same row order as the block
inputs. Per kwarg, per call, by the batch dimension (`split_model_input`): a tensor whose first dim is
the batch of `hidden_states` is per sample (rows concatenated over calls), a 0-d tensor (a scalar
timestep) is broadcast to the batch and per sample, any other tensor (FLUX's img_ids / txt_ids) is
shared and must be the same at every call; a list of batch length is per sample, other JSON-able values
are shared. Names the adapter lists in `model_shared_inputs` are always shared (a batch that happens to
equal the token count would otherwise make img_ids look per sample). Stores written before model inputs
existed simply lack `model_inputs/`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CalibrationError
# re-exported: the flatten / encode helpers lived here, and stream/ imports them from here
from .encoding import (decode_value, encode_value, flatten, shared_input_names, split_model_input,  # noqa: F401
                       to_module, unflatten)

STORE_FORMAT = 1


class ModelInputs(dict):
    """The transformer's captured forward kwargs: per-sample entries hold `rows` rows, the rest are shared."""

    def __init__(self, data: dict, per_sample):
        super().__init__(data)
        self.per_sample = frozenset(per_sample)
        self.rows = len(next(iter(data[k] for k in self.per_sample))) if self.per_sample else 0

    def select(self, idx: torch.Tensor) -> dict:
        """The kwargs of rows `idx` (shared entries as they are)."""
        out = {}
        for k, v in self.items():
            if k not in self.per_sample:
                out[k] = v
            elif torch.is_tensor(v):
                out[k] = v[idx]
            else:
                out[k] = [v[i] for i in idx.tolist()]
        return out


def _safe(name: str) -> str:
    return name.replace("/", "_")


def stats_from_sums(absmax: torch.Tensor, sumsq: torch.Tensor, count) -> dict:
    """{"absmax", "rms", "count"} of one linear's inputs from its running absmax, sum of squares and count."""
    n = float(count.item()) if torch.is_tensor(count) else float(count)
    return {"absmax": absmax, "rms": (sumsq / max(n, 1.0)).sqrt(), "count": int(n)}


def chunk_files(d: Path) -> list[Path]:
    return sorted(d.glob("chunk_*.safetensors"))


def read_file(path: Path, want=lambda key: True) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if want(k)}


def keys_filter(keys: list[str] | None):
    return lambda k: keys is None or k.split(".")[0] in keys or k == "timestep"


def iter_inputs(files: list[Path], shared: Path | None, keys: list[str] | None = None) -> Iterator[dict]:
    """Block inputs chunk by chunk (per-sample tensors of the chunk + the block's shared tensors)."""
    common = read_file(shared) if shared is not None and shared.exists() else {}
    for path in files:
        yield unflatten({**read_file(path, keys_filter(keys)), **common})


class CalibrationStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise CalibrationError(f"no calibration store at {self.root} (meta.json missing)",
                                   hint="run the capture again; an interrupted capture is not reused")
        self.meta = json.loads(meta_path.read_text())

    # -- reading ---------------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        return list(self.meta.get("blocks", []))

    @property
    def has_block_inputs(self) -> bool:
        return bool(self.meta.get("block_inputs"))

    def _read_chunks(self, sub: str, want=lambda key: True) -> dict[str, torch.Tensor]:
        """Concatenate (on dim 0) every chunk file under `sub`, keeping the keys `want` accepts."""
        parts: dict[str, list[torch.Tensor]] = {}
        for path in chunk_files(self.root / sub):
            for k, t in read_file(path, want).items():
                parts.setdefault(k, []).append(t)
        return {k: torch.cat(v) for k, v in parts.items()}

    def block_files(self, block: str) -> tuple[list[Path], Path]:
        """(chunk files, shared file) of one block's captured inputs."""
        if not self.has_block_inputs:
            raise CalibrationError("this calibration store holds statistics only, not block inputs",
                                   hint="a pass that needs block inputs must be in the recipe when capturing")
        files = chunk_files(self.root / "blocks" / _safe(block))
        if not files:
            raise CalibrationError(f"no captured inputs for block {block!r} in {self.root}")
        return files, self.root / "shared" / f"{_safe(block)}.safetensors"

    def block_inputs(self, block: str, keys: list[str] | None = None) -> dict:
        """All captured inputs of one block: per-sample tensors concatenated on dim 0, plus shared ones."""
        self.block_files(block)
        flat = self._read_chunks(f"blocks/{_safe(block)}", keys_filter(keys))
        shared = self.root / "shared" / f"{_safe(block)}.safetensors"
        if shared.exists():
            flat.update(read_file(shared))
        return unflatten(flat)

    def iter_block_inputs(self, block: str, keys: list[str] | None = None) -> Iterator[dict]:
        """The captured inputs of one block, one dict per chunk (one captured model call), shared inputs in each:
        what block-by-block work iterates, so memory holds one call's rows."""
        files, shared = self.block_files(block)
        return iter_inputs(files, shared, keys)

    def final_outputs(self) -> dict:
        out = self._read_chunks("final")
        if not out:
            raise CalibrationError(f"no captured final outputs in {self.root}")
        return out

    def model_inputs(self) -> ModelInputs:
        """The transformer's forward kwargs at every captured call (see the module docstring)."""
        d = self.root / "model_inputs"
        if not d.is_dir():
            raise CalibrationError(f"the calibration store {self.root} holds no model-level inputs (it was captured "
                                   "with statistics only, or before dicompress recorded model inputs)",
                                   hint=f"delete {self.root} and run again with a pass that reads model inputs in the "
                                        "recipe (distill, mask_prune, a depth pass ...; or `calibration: "
                                        "{block_inputs: true}`): the capture reruns")
        per = unflatten(self._read_chunks("model_inputs"))
        shared: dict = {}
        if (d / "shared.safetensors").exists():
            with safe_open(str(d / "shared.safetensors"), "pt") as f:
                shared = unflatten({k: f.get_tensor(k) for k in f.keys()})
        values = json.loads((d / "values.json").read_text()) if (d / "values.json").exists() else {}
        per_values = {k: decode_value(v) for k, v in values.get("per_sample", {}).items()}
        shared_values = {k: decode_value(v) for k, v in values.get("shared", {}).items()}
        return ModelInputs({**shared, **shared_values, **per, **per_values}, per_sample=set(per) | set(per_values))

    def linear_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {"absmax": [in], "rms": [in], "count": int} (per input channel)."""
        path = self.root / "linear_stats.safetensors"
        if not path.exists():
            raise CalibrationError(f"no linear statistics in {self.root}")
        out: dict[str, dict] = {}
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                name, _, field = k.rpartition(".")
                out.setdefault(name, {})[field] = f.get_tensor(k)
        return {name: stats_from_sums(s["absmax"], s["sumsq"], s["count"]) for name, s in out.items()}


class StoreWriter:
    """Writes a store; `meta.json` is written last, so an interrupted capture is never read as complete."""

    def __init__(self, root: str | Path, meta: dict):
        self.root = Path(root)
        if (self.root / "meta.json").exists():
            (self.root / "meta.json").unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = {"format": STORE_FORMAT, **meta}
        self._chunk_ids: dict[str, int] = {}
        self.rows = 0

    def write_chunk(self, sub: str, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        i = self._chunk_ids.get(sub, 0)
        self._chunk_ids[sub] = i + 1
        d = self.root / sub
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / f"chunk_{i:05d}.safetensors"))

    def write_block_chunk(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        self.write_chunk(f"blocks/{_safe(block)}", tensors)

    def write_shared(self, block: str, tensors: dict[str, torch.Tensor]) -> None:
        d = self.root / "shared"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / f"{_safe(block)}.safetensors"))

    def write_model_inputs_shared(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        """The model kwargs stored once: tensors, and {"shared": ..., "per_sample": ...} non-tensor values."""
        d = self.root / "model_inputs"
        d.mkdir(parents=True, exist_ok=True)
        if tensors:
            save_file(tensors, str(d / "shared.safetensors"))
        (d / "values.json").write_text(json.dumps(
            {kind: {k: encode_value(v) for k, v in vals.items()} for kind, vals in values.items()}) + "\n")

    def write_linear_stats(self, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        flat = {f"{n}.{k}": v.contiguous() for n, s in stats.items() for k, v in s.items()}
        save_file(flat, str(self.root / "linear_stats.safetensors"))

    def finish(self, **extra) -> CalibrationStore:
        self.meta.update(extra)
        (self.root / "meta.json").write_text(json.dumps(self.meta, indent=2) + "\n")
        return CalibrationStore(self.root)
