"""The streaming run's work directory (`<output>.work/stream/`): what a killed run leaves to resume from.

    key.json                      which recipe wrote it (a different recipe is refused, not mixed in); written
                                  with the first finished block, so a directory without one never blocks a
                                  changed recipe (it is reset)
    shards/<block>.safetensors    a finished block's tensors, exactly as they go into the artifact
    records/<block>.json          ... its manifest entries and report rows per pass; written last, so a
                                  block counts as finished only when both are complete
    acts/<block>/                 the inputs of the next block to compress (`blockdata.run_over`)
    probes/<block>.safetensors    the first and last blocks' outputs on one input row, for the write-time check
Files are written to a temporary name and renamed, so a kill never leaves a half-written one in place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..calib.store import _safe
from ..errors import RecipeError
from ..io.safetensors_file import save_aligned_safetensors

ROOT = "_root"       # shard name of the tensors outside the blocks (embedders, output head)


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class Journal:
    def __init__(self, root: Path, key: str):
        self.root, self.key = Path(root), key
        self.key_file = self.root / "key.json"
        if self._written_key() != key:
            if self.finished_blocks():
                raise RecipeError(f"{self.root} holds the finished blocks of a different recipe (or model, "
                                  "calibration, dtype or propagation); it is not resumed",
                                  hint=f"delete {self.root.parent} to start over, or run the recipe that wrote it")
            shutil.rmtree(self.root, ignore_errors=True)    # nothing finished: start clean
        for sub in ("shards", "records", "acts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _written_key(self) -> str | None:
        try:
            return json.loads(self.key_file.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    def finished_blocks(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "records").glob("*.json"))

    def shard(self, name: str) -> Path:
        return self.root / "shards" / f"{_safe(name)}.safetensors"

    def probe(self, block: str) -> Path:
        """The block's write-time check probe (io/load_check.py), taken while it was in memory."""
        return self.root / "probes" / f"{_safe(block)}.safetensors"

    def acts(self, block: str) -> Path:
        return self.root / "acts" / _safe(block)

    def record(self, block: str) -> dict | None:
        """What a finished block recorded, or None when it did not finish."""
        path = self.root / "records" / f"{_safe(block)}.json"
        if not (path.exists() and self.shard(block).exists()):
            return None
        return json.loads(path.read_text())

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        final = self.shard(name)
        tmp = final.with_suffix(".tmp")
        save_aligned_safetensors(tensors, tmp)
        _replace(tmp, final)
        return final

    def finish_block(self, block: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """The block's shard, then its record (the mark of a finished block)."""
        self.write_tensors(block, tensors)
        if not self.key_file.exists():                     # the first finished block: say whose it is
            tmp = self.key_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": self.key}) + "\n")
            _replace(tmp, self.key_file)
        final = self.root / "records" / f"{_safe(block)}.json"
        tmp = final.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n")
        _replace(tmp, final)

    def drop_acts(self, block: str) -> None:
        shutil.rmtree(self.acts(block), ignore_errors=True)
