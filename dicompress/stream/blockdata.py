"""Calibration one block at a time: run a block over its inputs (chunk by chunk, one captured model call per
chunk) to collect its linears' input statistics and to write the next block's inputs; and the view of the
calibration that passes see while that block is compressed."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..calib.capture import LinearStats
from ..calib.store import flatten, iter_inputs, keys_filter, read_file, stats_from_sums, to_module, unflatten
from ..errors import CalibrationError
from ..io.writer import fsync_dir

COMPLETE = "complete"      # marker file: every chunk of a block's inputs is written


class BlockInputs:
    """One block's captured inputs on disk: chunk files (per-sample tensors) and a shared file."""

    def __init__(self, files: list[Path], shared: Path | None):
        self.files, self.shared = list(files), shared

    def __iter__(self) -> Iterator[dict]:
        return iter_inputs(self.files, self.shared)


@torch.no_grad()
def run_over(module: nn.Module, adapter, name: str, inputs: BlockInputs, next_dir: Path | None = None,
             stats: bool = True) -> dict[str, dict]:
    """Run block `module` (named `name`) over `inputs`, one chunk at a time. Returns its nn.Linear inputs'
    statistics (as `CalibrationStore.linear_stats`, accumulated call by call as the capture does); with
    `next_dir`, writes the block's outputs there as the next block's inputs (same chunks, same keys)."""
    acc: dict[str, LinearStats] = {}
    handles = []
    if stats:
        for sub, mod in module.named_modules():
            if isinstance(mod, nn.Linear):
                key = f"{name}.{sub}"
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, key=key: acc.setdefault(key, LinearStats()).update(args[0])))
    if next_dir is not None:
        shutil.rmtree(next_dir, ignore_errors=True)
        next_dir.mkdir(parents=True)
    p = next(module.parameters())
    try:
        for i, path in enumerate(inputs.files):
            flat = read_file(path)
            shared = read_file(inputs.shared) if inputs.shared is not None and inputs.shared.exists() else {}
            out = adapter.run_block(module, to_module(unflatten({**flat, **shared}), p.device, p.dtype))
            if next_dir is not None:     # the next block's inputs, stored in the dtype this block's were
                kept = flat["hidden_states"].dtype if "hidden_states" in flat else torch.float32
                for k, v in out.items():
                    flatten(k, v.detach().to(kept).cpu(), flat)
                save_file(flat, str(next_dir / path.name))
    finally:
        for h in handles:
            h.remove()
    if next_dir is not None:
        if inputs.shared is not None and inputs.shared.exists():   # rotary tables etc.: the same for every block
            shutil.copyfile(inputs.shared, next_dir / "shared.safetensors")
        (next_dir / COMPLETE).write_text("")
        fsync_dir(next_dir)
    return {n: stats_from_sums(s.absmax, s.sumsq, s.count) for n, s in acc.items()}


def stored_inputs(d: Path) -> BlockInputs | None:
    """Inputs `run_over` wrote to `d`, or None when that write did not finish."""
    if not (d / COMPLETE).exists():
        return None
    return BlockInputs(sorted(d.glob("chunk_*.safetensors")), d / "shared.safetensors")


class BlockCalibration:
    """The calibration store as the passes see it while `block` is compressed: that block's inputs and its
    linears' statistics (the other blocks' data does not exist yet, or any more)."""

    has_block_inputs = True

    def __init__(self, meta: dict, block: str, inputs: BlockInputs, stats: dict[str, dict]):
        self.meta, self.block, self.inputs, self._stats = meta, block, inputs, stats

    @property
    def block_names(self) -> list[str]:
        return list(self.meta.get("blocks", []))

    def _check(self, block: str) -> None:
        if block != self.block:
            raise CalibrationError(f"streaming: block {block!r} was asked for while {self.block!r} is compressed; "
                                   "a pass that reads other blocks' data cannot stream",
                                   hint="set `streaming: {enabled: false}` in the recipe")

    def iter_block_inputs(self, block: str, keys: list[str] | None = None) -> Iterator[dict]:
        self._check(block)
        return iter_inputs(self.inputs.files, self.inputs.shared, keys)

    def block_inputs(self, block: str, keys: list[str] | None = None) -> dict:
        self._check(block)
        parts: dict[str, list[torch.Tensor]] = {}
        for path in self.inputs.files:
            for k, t in read_file(path, keys_filter(keys)).items():
                parts.setdefault(k, []).append(t)
        flat = {k: torch.cat(v) for k, v in parts.items()}
        if self.inputs.shared is not None and self.inputs.shared.exists():
            flat.update(read_file(self.inputs.shared))
        return unflatten(flat)

    def linear_stats(self) -> dict[str, dict]:
        return {n: dict(s) for n, s in self._stats.items()}
