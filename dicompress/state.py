"""CompressionState: everything a pass may read or change, in one object."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .records import PassRecord, pass_entry


@dataclass
class CompressionState:
    model: nn.Module                              # the diffusers transformer being rewritten (in place)
    adapter: Any                                  # arch.ArchAdapter for the model's family
    calibration: Any = None                       # calib.CalibrationStore the running pass reads (runner sets it)
    teacher_factory: Callable[[], nn.Module] | None = None   # builds a fresh uncompressed copy
    manifest: list[dict] = field(default_factory=list)       # ordered record of every change, whole run
    records: list[PassRecord] = field(default_factory=list)  # one per pass and scope, in run order
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    files: dict[str, bytes] = field(default_factory=dict)    # extra artifact files passes produce (plots ...)
    work_dir: Path | None = None                  # where passes checkpoint (run: <output>.work/, kept on failure)
    recipe_hash: str | None = None                # hash of the recipe's model, calibration and passes
    pass_index: int = 0                           # position of the running pass (set by run_passes)
    # blocks the passes may touch; None = the whole model. The streaming sweep sets it to the one block whose
    # weights are in memory (the others are on the meta device)
    scope: tuple[str, ...] | None = None
    current: PassRecord | None = None             # the running pass's record (set by run_passes)
    _unreported: list[dict] = field(default_factory=list)    # manifest entries of a directly applied pass
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

    def _loose(self, name: str) -> PassRecord:
        """A pass applied directly (`p.apply(state)`, not through the runner) still gets its record."""
        rec = PassRecord(len(self.records), name, {}, None if self.scope is None else ",".join(self.scope))
        self.records.append(rec)
        return rec

    def record(self, entry: dict) -> None:
        """Append one change to the manifest (what a loader replays on the meta model)."""
        if "op" not in entry or "module" not in entry:
            raise ValueError(f"manifest entries need 'op' and 'module': {entry}")
        if self.current is not None:
            self.current.manifest.append(entry)
        else:
            self._unreported.append(entry)
        self.manifest.append(entry)

    def add_pass_report(self, name: str, summary: dict, layers: list[dict] | None = None) -> None:
        """The running pass's summary and per-layer rows."""
        rec = self.current if self.current is not None else self._loose(name)
        if self.current is None:
            rec.manifest, self._unreported = self._unreported, []
        rec.summary = dict(summary)
        rec.layers.extend(layers or [])

    def add_section(self, key: str, value: Any) -> None:
        """A report section of the running pass (e.g. `depth_analysis`), readable by later passes."""
        (self.current if self.current is not None else self._loose("?")).sections[key] = value

    def section(self, key: str) -> Any:
        """A section an earlier pass of this run added, or None."""
        return next((r.sections[key] for r in reversed(self.records) if key in r.sections), None)

    @property
    def report(self) -> dict:
        """The passes' part of the report so far (read-only view: `passes`, `layers`, sections)."""
        rep: dict[str, Any] = {"passes": [], "layers": []}
        for r in self.records:
            rep["passes"].append(pass_entry(r.name, r.summary, r.seconds, r.config))
            rep["layers"] += r.layers
            rep.update(r.sections)
        return rep
