"""CompressionState: everything a pass may read or change, in one object."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class CompressionState:
    model: nn.Module                              # the diffusers transformer being rewritten (in place)
    adapter: Any                                  # arch.ArchAdapter for the model's family
    calibration: Any = None                       # calib.CalibrationStore, when the recipe captured one
    teacher_factory: Callable[[], nn.Module] | None = None   # builds a fresh uncompressed copy
    manifest: list[dict] = field(default_factory=list)       # ordered record of every change
    report: dict[str, Any] = field(default_factory=lambda: {"passes": [], "layers": []})
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    files: dict[str, bytes] = field(default_factory=dict)    # extra artifact files passes produce (plots ...)
    work_dir: Path | None = None                  # where passes checkpoint (run: <output>.work/, kept on failure)
    recipe_hash: str | None = None                # hash of the recipe's model, calibration and passes
    pass_index: int = 0                           # position of the running pass (set by run_passes)
    # blocks the passes may touch; None = the whole model. The streaming sweep sets it to the one block whose
    # weights are in memory (the others are on the meta device)
    scope: tuple[str, ...] | None = None
    _teacher: nn.Module | None = None

    def in_scope(self, name: str) -> bool:
        """Whether module `name` lies in a block the passes may touch now."""
        return self.scope is None or any(name == b or name.startswith(b + ".") for b in self.scope)

    def checkpoint_key(self, what: str) -> str:
        """`<recipe hash>:<pass index>:<what>`: a checkpoint written under another recipe is refused on resume."""
        return f"{self.recipe_hash or 'api'}:{self.pass_index}:{what}"

    @property
    def teacher(self) -> nn.Module:
        """The uncompressed model (built once, on first use)."""
        if self._teacher is None:
            if self.teacher_factory is None:
                raise RuntimeError("this pass needs the teacher, but no teacher_factory was given")
            self._teacher = self.teacher_factory().eval().requires_grad_(False)
        return self._teacher

    def record(self, entry: dict) -> None:
        """Append one change to the manifest (what a loader replays on the meta model)."""
        if "op" not in entry or "module" not in entry:
            raise ValueError(f"manifest entries need 'op' and 'module': {entry}")
        self.manifest.append(entry)

    def add_pass_report(self, name: str, summary: dict, layers: list[dict] | None = None) -> None:
        self.report["passes"].append({"pass": name, **summary})
        if layers:
            self.report["layers"].extend(layers)
